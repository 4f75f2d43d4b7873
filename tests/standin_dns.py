"""The stand-in for "the host's resolver" that network tests run inside their own namespace: source text put into
their server scripts (which run under ``ip netns exec``). It answers A queries for the names of a table, NXDOMAIN for
the rest, and calls the script's ``heard(name, qtype, proto)`` for each query (the tests read what it heard)."""

DNS_RESPONDER = r'''
def answer(q, proto):
    pos, labels = 12, []
    while q[pos]:
        labels.append(q[pos + 1:pos + 1 + q[pos]].decode("latin-1")); pos += q[pos] + 1
    qtype = struct.unpack_from("!H", q, pos + 1)[0]; question = q[12:pos + 5]; name = ".".join(labels).lower()
    heard(name, qtype, proto)
    addrs = table.get(name)
    if addrs is None:
        return q[:2] + struct.pack("!5H", 0x8183, 1, 0, 0, 0) + question
    addrs = addrs if qtype == 1 else []
    rrs = b"".join(b"\xc0\x0c" + struct.pack("!2HIH", 1, 1, 60, 4) + socket.inet_aton(a) for a in addrs)
    return q[:2] + struct.pack("!5H", 0x8180, 1, len(addrs), 0, 0) + question + rrs
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((dns_addr, 53))
    while True:
        q, a = s.recvfrom(65535); s.sendto(answer(q, "udp"), a)
'''
