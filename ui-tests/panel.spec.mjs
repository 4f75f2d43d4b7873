// Browser test of the microagent JupyterLab panel, run with plain `node` by tests/test_labextension.py.
//
// Environment:
//   LAB_URL      base URL of a running `jupyter lab` with the microagent server extension, ending in '/'
//   LAB_TOKEN    its token
//   MA_WS        a RUNNING workspace that holds volume MA_VOL
//   MA_VOL       a volume attached to MA_WS
//   SCREENSHOTS  directory for screenshots (default ./screenshots)
//   CHROMIUM     browser executable (default /usr/bin/chromium; Debian: apt-get install -y chromium)
//
// Prints progress lines and, on success, a last line `RESULT {...}`; exits non-zero with a message otherwise.
import { must, openBrowser } from './lab.mjs';

const LAB_URL = must('panel.spec', 'LAB_URL');
const TOKEN = must('panel.spec', 'LAB_TOKEN');
const WS = must('panel.spec', 'MA_WS');
const VOL = must('panel.spec', 'MA_VOL');
const t0 = Date.now();
const { page, context, step, shot, until, result } = await openBrowser('panel.spec');
const pageErrors = [];
page.on('pageerror', err => pageErrors.push(`${err.message}\n${err.stack ?? ''}`));
const apiRequests = [];
page.on('request', req => {
  if (req.url().includes('/microagent/api/')) {
    apiRequests.push({ url: new URL(req.url()).pathname, method: req.method(), at: Date.now() });
  }
});

const panel = '#microagent-panel';
const wsRow = `${panel} li[data-ws="${WS}"]`;
const volRow = `${panel} li[data-vol="${VOL}"]`;
const textOf = sel => page.locator(sel).first().textContent();

// ---- notebook helpers ------------------------------------------------------------------------------------
const cellSel = i => `.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell >> nth=${i}`;

async function runCell(i, { wait = true, timeout = 120_000 } = {}) {
  const cell = page.locator(cellSel(i));
  const prompt = cell.locator('.jp-InputArea-prompt');
  for (let attempt = 0; ; attempt++) {
    await prompt.click();
    await page.keyboard.press('Escape');
    await page.keyboard.press('Shift+Enter');
    // queued ([*]) or done ([n]); a run sent while the kernel was still connecting is dropped: send it again
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline && /\[ ?\]/.test((await prompt.textContent()) ?? '')) {
      await page.waitForTimeout(100);
    }
    if (!/\[ ?\]/.test((await prompt.textContent()) ?? '') || attempt >= 2) {
      break;
    }
  }
  if (wait) {
    await cellDone(i, timeout);
  }
  return cell;
}

async function cellDone(i, timeout) {
  const prompt = page.locator(cellSel(i)).locator('.jp-InputArea-prompt');
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    if (/\[\d+\]/.test((await prompt.textContent()) ?? '')) {
      return;
    }
    await page.waitForTimeout(100);
  }
  throw new Error(`cell ${i} still running after ${timeout / 1000} s`);
}

const outputText = async i => (await page.locator(cellSel(i)).locator('.jp-OutputArea').textContent()) ?? '';

async function expectOutput(i, want, what) {
  const text = await outputText(i);
  if (!want.test(text) || /Traceback|Error/.test(text)) {
    throw new Error(`${what}: cell ${i} output ${JSON.stringify(text.slice(0, 800))}`);
  }
  return text;
}

async function notebookChecks(nb) {
  await page.goto(`${LAB_URL}lab/tree/${nb}?token=${encodeURIComponent(TOKEN)}`, { waitUntil: 'domcontentloaded' });
  await page.locator(cellSel(0)).waitFor({ state: 'visible', timeout: 60_000 });
  await until('the notebook kernel to be idle',
    () => /\| Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent ?? ''), undefined, 60_000);
  await runCell(0); // %load_ext
  await runCell(1); // %microagent start WS
  await runCell(2);
  step(`exec with a quoted command: ${JSON.stringify((await expectOutput(2, /hi there/, 'sh -c "echo hi there"')).trim())}`);

  await runCell(3); // the logs widget
  await until('the log widget to render', () => !!document.querySelector('.microagent-serial-log pre'), undefined,
    30_000);
  await runCell(4); // 60 console lines, then the marker
  await until('the log widget to show its last line in view', () => {
    const pre = document.querySelector('.microagent-serial-log pre');
    const node = pre?.firstChild;
    const at = node?.textContent?.lastIndexOf('ma-last-line') ?? -1;
    if (at < 0) {
      return false;
    }
    const range = document.createRange();
    range.setStart(node, at);
    range.setEnd(node, at + 'ma-last-line'.length);
    const line = range.getBoundingClientRect();
    const box = pre.parentElement.getBoundingClientRect();
    const preScrolls = pre.scrollHeight > pre.clientHeight + 1;
    return !preScrolls && line.height > 0 && line.top >= box.top - 1 && line.bottom <= box.bottom + 1;
  }, undefined, 30_000);
  step('log widget: the last console line is in view (its <pre> does not scroll itself)');
  result.screenshots.push(await shot('notebook-log-widget.png'));

  await runCell(5); // halt, for cp
  await runCell(6);
  await expectOutput(6, /Copied in\.txt/, 'cp into the workspace');
  await runCell(7);
  await expectOutput(7, /Copied/, 'cp out of the workspace');
  await runCell(8);
  await expectOutput(8, /payload from host/, 'the copied-back file');
  step('cp both ways: "Copied" twice, no traceback, the file came back');

  await runCell(9, { wait: false }); // a one-shot run that ignores INT and TERM
  for (const deadline = Date.now() + 180_000; !(await outputText(9)).includes('started');) {
    if (Date.now() > deadline) {
      throw new Error(`the one-shot command did not print "started": ${await outputText(9)}`);
    }
    await page.waitForTimeout(100);
  }
  const interruptedAt = Date.now();
  const button = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) [data-command="notebook:interrupt-kernel"]');
  if (await button.count()) {
    await button.first().click();
  } else {
    await page.keyboard.press('Escape');
    await page.keyboard.press('i');
    await page.keyboard.press('i');
  }
  await cellDone(9, 10_000);
  result.interruptSeconds = (Date.now() - interruptedAt) / 1000;
  const interrupted = await outputText(9);
  if (!/KeyboardInterrupt: the guest command was stopped and no VM is left running/.test(interrupted) ||
      /Traceback/.test(interrupted)) {
    throw new Error(`interrupt output: ${JSON.stringify(interrupted.slice(-800))}`);
  }
  await runCell(10); // %microagent ps
  if (/run-\d/.test(await outputText(10))) {
    throw new Error(`a one-shot VM is left running: ${await outputText(10)}`);
  }
  step(`interrupt of a command ignoring INT and TERM: kernel idle after ${result.interruptSeconds} s, no VM left`);
  result.screenshots.push(await shot('notebook-interrupted.png'));
}

try {
  // ---- open JupyterLab and the panel (sidebar icon) ----------------------------------------------------
  await page.goto(`${LAB_URL}lab?token=${encodeURIComponent(TOKEN)}`, { waitUntil: 'domcontentloaded' });
  const tab = page.locator('.jp-SideBar li[data-id="microagent-panel"]');
  await tab.waitFor({ state: 'visible', timeout: 60_000 });
  step('lab loaded; microagent sidebar icon present');
  if (!(await page.locator(panel).isVisible())) {
    await tab.click();
  }
  await page.locator(panel).waitFor({ state: 'visible' });
  step('panel opened');

  // ---- the running workspace ---------------------------------------------------------------------------
  await until(
    `workspace "${WS}" listed as running`,
    sel => document.querySelector(sel)?.textContent === 'running',
    `${wsRow} .ma-Badge`
  );
  const meta = await textOf(`${wsRow} .ma-Meta`);
  if (!/profile tiny/.test(meta) || !/accel /.test(meta)) {
    throw new Error(`workspace meta line lacks accelerator/profile: ${JSON.stringify(meta)}`);
  }
  await until(
    'exec readiness dot to turn ready',
    sel => document.querySelector(sel)?.dataset.signal === 'ready',
    `${wsRow} .ma-Signal:nth-child(2)`
  );
  const signals = await page
    .locator(`${wsRow} .ma-Signal`)
    .evaluateAll(nodes => nodes.map(n => `${n.textContent}:${n.dataset.signal}`));
  step(`workspace running (${meta}; ${signals.join(' ')})`);

  // ---- egress: a name the allow-list refuses, shown with an Allow action ------------------------------
  // the guest asks for blocked.test over HTTP; its VM's egress proxy refuses before dialing anything
  const refused = await page.evaluate(
    async ([base, token, ws]) => {
      const r = await fetch(`${base}microagent/api/workspaces/${ws}/exec`, {
        method: 'POST',
        headers: { Authorization: `token ${token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({
          argv: ['sh', '-c', 'printf "GET / HTTP/1.0\\r\\nHost: blocked.test\\r\\n\\r\\n" | nc -w 3 45.0.0.1 80; true'],
          timeout: 30
        })
      });
      return r.status;
    },
    [LAB_URL, TOKEN, WS]
  );
  if (refused !== 200) {
    throw new Error(`exec of the refused request answered ${refused}`);
  }
  const allowButton = `${wsRow} .ma-BlockedItem[data-entry="blocked.test:80"] .ma-Allow`;
  await until('the refused name blocked.test:80 with an Allow button', sel => !!document.querySelector(sel), allowButton);
  await page.locator(allowButton).click();
  await page.locator('.jp-Dialog .jp-mod-accept').click();
  await until(
    'the allow-list in the workspace row to name blocked.test:80',
    sel => (document.querySelector(sel)?.textContent ?? '').includes('blocked.test:80'),
    `${wsRow} .ma-Meta`
  );
  await until('the Allow item to go away', sel => !document.querySelector(sel), allowButton);
  result.allowed = 'blocked.test:80';
  step('a refused name was shown and allowed from the panel');

  // ---- the volume and its holder ---------------------------------------------------------------------
  await until(
    `volume "${VOL}" to show holder "${WS}"`,
    ([sel, ws]) => document.querySelector(sel)?.textContent === ws,
    [`${volRow} .ma-Holder`, WS]
  );
  await until(
    `workspace row to list volume "${VOL}"`,
    ([sel, vol]) => (document.querySelector(sel)?.textContent ?? '').includes(vol),
    [`${wsRow} .ma-WsVolumes`, VOL]
  );
  step(`volume ${VOL} shows holder ${WS}; workspace row lists it (${await textOf(`${wsRow} .ma-WsVolumes`)})`);

  // ---- serial log of the selected workspace --------------------------------------------------------
  await page.locator(`${wsRow} .ma-Name`).click();
  await until(
    'the workspace to be selected',
    sel => document.querySelector(sel)?.classList.contains('ma-mod-selected'),
    wsRow
  );
  await until(
    'serial output "microagent: boot at" in the log view',
    sel => (document.querySelector(sel)?.textContent ?? '').includes('microagent: boot at'),
    `${panel} .ma-Log`
  );
  await until(
    'the log view to follow the end',
    sel => {
      const pre = document.querySelector(sel);
      return pre && pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
    },
    `${panel} .ma-Log`
  );
  result.logChars = (await textOf(`${panel} .ma-Log`)).length;
  step(`log view shows the serial console (${result.logChars} chars) and is scrolled to the end`);
  // live output: the guest writes to its console; the view follows it, then stops following once scrolled up
  const guestConsole = async script => {
    const res = await page.evaluate(
      async ([base, token, ws, script]) => {
        const r = await fetch(`${base}microagent/api/workspaces/${ws}/exec`, {
          method: 'POST',
          headers: { Authorization: `token ${token}`, 'Content-Type': 'application/json' },
          body: JSON.stringify({ argv: ['sh', '-c', `${script} > /dev/console`], timeout: 30 })
        });
        return { status: r.status, body: await r.json() };
      },
      [LAB_URL, TOKEN, WS, script]
    );
    if (res.status !== 200 || res.body.exitCode !== 0) {
      throw new Error(`exec in the guest failed: ${JSON.stringify(res)}`);
    }
  };
  const logSel = `${panel} .ma-Log`;
  await guestConsole('for i in $(seq 1 120); do echo ma-live-line-$i; done');
  await until(
    'live console output to reach the log view and stay scrolled to the end',
    sel => {
      const pre = document.querySelector(sel);
      return pre && pre.textContent.includes('ma-live-line-120') && pre.scrollHeight > pre.clientHeight &&
        pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
    },
    logSel
  );
  step('live console output followed (120 new lines, view at the end)');
  result.screenshots = [await shot('panel-running.png')];
  await page.locator(logSel).evaluate(pre => {
    pre.scrollTop = 0;
  });
  await page.locator(`${panel} .ma-FollowButton`).waitFor({ state: 'visible' });
  await guestConsole('echo ma-live-while-scrolled-up');
  await until(
    'output written while scrolled up to arrive',
    sel => document.querySelector(sel)?.textContent.includes('ma-live-while-scrolled-up'),
    logSel
  );
  await page.waitForTimeout(200);
  const scrollTop = await page.locator(logSel).evaluate(pre => pre.scrollTop);
  if (scrollTop > 4) {
    throw new Error(`the log view jumped to the end (scrollTop ${scrollTop}) although the user scrolled up`);
  }
  await page.locator(`${panel} .ma-FollowButton`).click();
  await until(
    'Follow to scroll back to the end',
    sel => {
      const pre = document.querySelector(sel);
      return pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
    },
    logSel
  );
  step('scrolled up: new output did not move the view; Follow returned to the end');

  // ---- polling updates in place (no rebuilt rows) ----------------------------------------------------
  await page.evaluate(([ws, vol]) => {
    const w = window;
    w.__ma = {
      wsRow: document.querySelector(ws),
      volRow: document.querySelector(vol),
      listMutations: 0,
      volMutations: 0
    };
    const lists = ['.ma-WorkspaceList', '.ma-VolumeList'].map(s => document.querySelector(`#microagent-panel ${s}`));
    new MutationObserver(records => {
      w.__ma.listMutations += records.length;
    }).observe(lists[0], { childList: true });
    new MutationObserver(records => {
      w.__ma.volMutations += records.length;
    }).observe(lists[1], { childList: true, subtree: true, characterData: true, attributes: true });
  }, [wsRow, volRow]);
  const before = apiRequests.filter(r => r.url.endsWith('/microagent/api/workspaces')).length;
  await page.waitForTimeout(4_500);
  const polls = apiRequests.filter(r => r.url.endsWith('/microagent/api/workspaces')).length - before;
  const stable = await page.evaluate(([ws, vol]) => {
    const w = window;
    return {
      sameWsRow: w.__ma.wsRow === document.querySelector(ws) && w.__ma.wsRow.isConnected,
      sameVolRow: w.__ma.volRow === document.querySelector(vol) && w.__ma.volRow.isConnected,
      listMutations: w.__ma.listMutations,
      volMutations: w.__ma.volMutations
    };
  }, [wsRow, volRow]);
  if (polls < 2) {
    throw new Error(`the panel polled only ${polls} time(s) in 4.5 s (refreshInterval default is 2 s)`);
  }
  if (!stable.sameWsRow || !stable.sameVolRow || stable.listMutations || stable.volMutations) {
    throw new Error(`polling rebuilt unchanged rows: ${JSON.stringify(stable)}`);
  }
  result.polls = polls;
  step(`${polls} polls left unchanged rows untouched (${JSON.stringify(stable)})`);

  // ---- create-volume form: the server's error in words, then a real create + confirmed delete ---------
  const form = `${panel} .ma-VolumeForm`;
  await page.locator(`${form} .ma-VolumeName`).fill(VOL);
  await page.locator(`${form} .ma-VolumeSize`).fill('16');
  await page.locator(`${form} button[type="submit"]`).click();
  await until(
    'the form to show the server error for a duplicate volume',
    sel => {
      const node = document.querySelector(sel);
      return node && !node.hidden && /already exists/.test(node.textContent);
    },
    `${form} .ma-FormError`
  );
  const formError = await textOf(`${form} .ma-FormError`);
  if (/Traceback|at \w+ \(|Error:/.test(formError)) {
    throw new Error(`the form error looks like a stack trace: ${formError}`);
  }
  step(`duplicate volume refused in words: ${JSON.stringify(formError)}`);

  const extra = `${VOL}x`;
  await page.locator(`${form} .ma-VolumeName`).fill(extra);
  await page.locator(`${form} .ma-VolumeSize`).fill('8');
  await page.locator(`${form} button[type="submit"]`).click();
  const extraRow = `${panel} li[data-vol="${extra}"]`;
  await page.locator(extraRow).waitFor({ state: 'visible' });
  const extraText = await page.locator(extraRow).textContent();
  if (!extraText.includes('8 MiB') || !extraText.includes('unattached')) {
    throw new Error(`new volume row: ${JSON.stringify(extraText)}`);
  }
  step(`volume ${extra} created from the form (${extraText})`);
  await page.locator(`${extraRow} .ma-Action-delete`).click();
  const dialog = page.locator('.jp-Dialog');
  await dialog.waitFor({ state: 'visible' });
  const dialogText = await dialog.textContent();
  if (!dialogText.includes(`Delete volume "${extra}"`)) {
    throw new Error(`unexpected confirmation dialog: ${dialogText}`);
  }
  await shot('volume-delete-dialog.png');
  await dialog.locator('button.jp-mod-warn', { hasText: 'Delete' }).click();
  await page.locator(extraRow).waitFor({ state: 'detached' });
  step(`volume ${extra} deleted after confirmation`);

  // ---- command palette has the panel's commands -----------------------------------------------------
  await page.locator('#jp-main-dock-panel').click({ position: { x: 300, y: 300 } }).catch(() => {});
  await page.keyboard.press('Control+Shift+C');
  const paletteInput = page.locator('.jp-mod-commandPalette input, .lm-CommandPalette-input').first();
  await paletteInput.waitFor({ state: 'visible' });
  await paletteInput.fill('microagent');
  await until(
    'microagent commands in the command palette',
    () => {
      const labels = [...document.querySelectorAll('.lm-CommandPalette-itemLabel')].map(n => n.textContent);
      return ['Halt Workspace', 'Kill Workspace', 'Create microagent Volume', 'Open microagent Panel',
        'Refresh microagent Workspaces'].every(want => labels.some(l => l.includes(want)));
    }
  );
  result.palette = await page
    .locator('.lm-CommandPalette-item:visible .lm-CommandPalette-itemLabel')
    .allTextContents();
  await page.keyboard.press('Escape');
  step(`command palette: ${result.palette.join(' | ')}`);

  // ---- kill asks for confirmation (cancelled here) -------------------------------------------------------
  await page.locator(`${wsRow} button[data-action="kill"]`).click();
  await dialog.waitFor({ state: 'visible' });
  if (!(await dialog.textContent()).includes(`Kill workspace "${WS}"?`)) {
    throw new Error('kill did not ask for confirmation');
  }
  await dialog.locator('button.jp-mod-reject').click();
  await dialog.waitFor({ state: 'detached' });
  await page.waitForTimeout(300);
  if ((await textOf(`${wsRow} .ma-Badge`)) !== 'running') {
    throw new Error('cancelling kill changed the workspace');
  }
  step('kill asked for confirmation; cancel left the workspace running');

  // ---- halt ------------------------------------------------------------------------------------------
  await page.locator(`${wsRow} button[data-action="halt"]`).click();
  await until(
    `workspace "${WS}" to show halted`,
    sel => document.querySelector(sel)?.textContent === 'halted',
    `${wsRow} .ma-Badge`,
    120_000
  );
  const haltPost = apiRequests.find(r => r.method === 'POST' && r.url.endsWith(`/workspaces/${WS}/halt`));
  if (!haltPost) {
    throw new Error('no POST .../halt was sent');
  }
  await until(
    'start to be enabled and halt disabled after halting',
    sel => {
      const row = document.querySelector(sel);
      return row && !row.querySelector('[data-action="start"]').disabled && row.querySelector('[data-action="halt"]').disabled;
    },
    wsRow
  );
  await until(
    `volume "${VOL}" released (last holder "${WS}")`,
    ([sel, ws]) => document.querySelector(sel)?.textContent === `last: ${ws}`,
    [`${volRow} .ma-Holder`, WS]
  );
  step(`halted from the panel; volume shows "last: ${WS}"`);
  result.screenshots.push(await shot('panel-halted.png'));

  // ---- a notebook: magics with quoting, cp, the log widget following, interrupt -------------------------
  if (process.env.MA_NOTEBOOK) {
    await notebookChecks(process.env.MA_NOTEBOOK);
  }

  const ours = pageErrors.filter(e => e.includes('microagent'));
  if (ours.length) {
    throw new Error(`uncaught errors in the page from the extension:\n${ours.join('\n')}`);
  }
  result.ok = true;
  result.seconds = (Date.now() - t0) / 1000;
  result.pageErrors = pageErrors.length;
  console.log(`RESULT ${JSON.stringify(result)}`);
} catch (error) {
  let file = '';
  try {
    file = await shot('failure.png');
  } catch {
    // the page may be gone
  }
  console.error(`panel.spec FAILED after steps [${result.steps.join('; ')}]: ${error.message}`);
  if (file) {
    console.error(`screenshot: ${file}`);
  }
  process.exitCode = 1;
} finally {
  await context.close().catch(() => {});
}
