/**
 * The microagent sidebar panel: workspaces, volumes, a create-volume form and the serial log of the selected
 * workspace. Polls the REST API and updates rows in place (keyed by name) so nothing flickers.
 */
import {
  Dialog,
  Notification,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { Message } from '@lumino/messaging';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import {
  el,
  reorder,
  setAttr,
  setClass,
  setDisabled,
  setHidden,
  setText
} from './dom';
import { askKernelChoice, kernelNotebook, ownerLine } from './kernelChoice';
import { LogView } from './logview';
import { defaultDir, downloadFrom, uploadTo } from './workspaceFiles';
import {
  api,
  errorMessage,
  IReadiness,
  IVolume,
  IWorkspace,
  KernelChoice,
  WorkspaceAction
} from './request';

export type PanelAction = WorkspaceAction | 'delete';

const ACTIONS: PanelAction[] = ['start', 'halt', 'stop', 'kill', 'delete'];
const ACTION_LABELS: Record<PanelAction, string> = {
  start: 'Start',
  halt: 'Halt',
  stop: 'Stop',
  kill: 'Kill',
  delete: 'Delete'
};
const ACTION_HELP: Record<PanelAction, string> = {
  start: 'Boot the workspace',
  halt: 'Clean shutdown that keeps the disks',
  stop: 'Ask the guest to shut down (marked failed if it has not exited in 5 s)',
  kill: 'Hard-terminate the VM',
  delete: 'Delete the workspace record and its rootfs'
};
const PENDING: Record<PanelAction, string> = {
  start: 'starting…',
  halt: 'halting…',
  stop: 'stopping…',
  kill: 'killing…',
  delete: 'deleting…'
};
const SIGNALS: [keyof IWorkspace, string][] = [
  ['guestReady', 'guest'],
  ['execReady', 'exec'],
  ['shellReady', 'shell'],
  ['mediationReady', 'mediation']
];
/**
 * Whether the engine accepts `action` for this workspace now: the server sends the allowed actions with each
 * workspace (`actions`, computed by the engine's state machine); the panel keeps no copy of those rules.
 */
export function actionAllowed(
  action: PanelAction,
  ws: IWorkspace | undefined
): boolean {
  return !!ws && (ws.actions ?? []).includes(action);
}

/** A supervisor (and so usually a VM) is alive: the serial log may still grow. */
export function isLive(ws: IWorkspace | undefined): boolean {
  return !!ws && !!ws.live;
}

interface IWorkspaceRow {
  node: HTMLLIElement;
  name: HTMLElement;
  badge: HTMLElement;
  pending: HTMLElement;
  meta: HTMLElement;
  owner: HTMLElement;
  dots: HTMLElement[];
  volumes: HTMLElement;
  blocked: HTMLElement;
  error: HTMLElement;
  buttons: Map<PanelAction, HTMLButtonElement>;
  sync: HTMLButtonElement;
  key: string;
}

/** At most this many refused names are listed per workspace (the most recent ones). */
const MAX_BLOCKED_SHOWN = 5;

/**
 * The names a workspace's egress proxy refused because the allow-list does not name them, newest first, once
 * each, as `name:port` (what `--allow` takes).
 */
export function blockedNames(w: IWorkspace): string[] {
  const recent = w.egress?.egress?.recentBlocked ?? [];
  const policy = w.networkPolicy as { allow?: string[] } | undefined;
  const allowed = new Set(policy?.allow ?? []);
  const out: string[] = [];
  for (const item of [...recent].reverse()) {
    if (
      typeof item.name !== 'string' ||
      !String(item.reason).includes('not on the allow-list')
    ) {
      continue;
    }
    const entry = item.port ? `${item.name}:${item.port}` : item.name;
    if (!out.includes(entry) && !allowed.has(entry)) {
      out.push(entry);
    }
  }
  return out.slice(0, MAX_BLOCKED_SHOWN);
}

interface IVolumeRow {
  node: HTMLLIElement;
  size: HTMLElement;
  holder: HTMLElement;
  remove: HTMLButtonElement;
  key: string;
}

export class MicroagentPanel extends Widget {
  constructor() {
    super();
    this.id = 'microagent-panel';
    this.addClass('ma-Panel');
    this.title.caption = 'microagent: microVM workspaces';
    this.title.label = '';

    const header = el('div', 'ma-Header');
    header.append(el('h2', 'ma-Title', 'microagent'));
    this._refreshButton = el('button', 'ma-Button ma-RefreshButton', 'Refresh');
    this._refreshButton.title = 'Refresh workspaces and volumes now';
    this._refreshButton.addEventListener('click', () => void this.refresh());
    header.append(this._refreshButton);

    this._errorBox = el('div', 'ma-ErrorBox');
    this._errorBox.setAttribute('role', 'alert');
    this._errorBox.hidden = true;
    this._errorText = el('span', 'ma-ErrorText');
    const dismiss = el('button', 'ma-Button ma-Dismiss', '×');
    dismiss.title = 'Dismiss';
    dismiss.addEventListener('click', () => this.clearError());
    this._errorBox.append(this._errorText, dismiss);

    const lists = el('div', 'ma-Lists');

    const wsSection = el('section', 'ma-Section ma-WorkspaceSection');
    const wsHeader = el('div', 'ma-SectionHeader');
    wsHeader.append(el('h3', '', 'Workspaces'));
    this._wsEmpty = el('div', 'ma-Empty', 'Loading…');
    this._wsList = el('ul', 'ma-List ma-WorkspaceList');
    wsSection.append(wsHeader, this._wsEmpty, this._wsList);

    const volSection = el('section', 'ma-Section ma-VolumeSection');
    const volHeader = el('div', 'ma-SectionHeader');
    volHeader.append(el('h3', '', 'Volumes'));
    this._volEmpty = el('div', 'ma-Empty', 'Loading…');
    this._volList = el('ul', 'ma-List ma-VolumeList');
    volSection.append(
      volHeader,
      this._volEmpty,
      this._volList,
      this._buildVolumeForm()
    );

    lists.append(wsSection, volSection);
    this._log = new LogView();
    this.node.append(header, this._errorBox, lists, this._log.node);
  }

  /** The selected workspace (the one the log shows and the commands act on). */
  get selected(): string | null {
    return this._selected;
  }

  get selectionChanged(): ISignal<this, string | null> {
    return this._selectionChanged;
  }

  /** Emitted after every refresh (commands re-check whether they are enabled). */
  get refreshed(): ISignal<this, void> {
    return this._refreshed;
  }

  get workspaces(): ReadonlyMap<string, IWorkspace> {
    return this._workspaces;
  }

  get volumes(): ReadonlyMap<string, IVolume> {
    return this._volumes;
  }

  /** Seconds between polls (settings: refreshInterval). */
  get refreshInterval(): number {
    return this._interval;
  }
  set refreshInterval(seconds: number) {
    const value = Number.isFinite(seconds) && seconds > 0 ? seconds : 2;
    if (value !== this._interval) {
      this._interval = value;
      this._schedule();
    }
  }

  select(name: string | null): void {
    if (name === this._selected) {
      return;
    }
    const before = this._selected && this._wsRows.get(this._selected);
    if (before) {
      before.node.classList.remove('ma-mod-selected');
      before.node.setAttribute('aria-selected', 'false');
    }
    this._selected = name;
    const after = name && this._wsRows.get(name);
    if (after) {
      after.node.classList.add('ma-mod-selected');
      after.node.setAttribute('aria-selected', 'true');
    }
    this._log.setWorkspace(name, isLive(name ? this._workspaces.get(name) : undefined));
    this._selectionChanged.emit(name);
  }

  showError(message: string): void {
    setText(this._errorText, message);
    setHidden(this._errorBox, false);
  }

  clearError(): void {
    setHidden(this._errorBox, true);
    setText(this._errorText, '');
  }

  /** Fetch workspaces and volumes and update the DOM in place. */
  async refresh(): Promise<void> {
    if (this._inflight) {
      return this._inflight;
    }
    this._inflight = this._refresh().finally(() => {
      this._inflight = null;
    });
    return this._inflight;
  }

  /** Run a workspace action; destructive ones (kill, delete) ask first. Errors are shown in words. */
  async runAction(action: PanelAction, name?: string | null): Promise<boolean> {
    const target = name ?? this._selected;
    if (!target) {
      await showErrorMessage(
        'No workspace selected',
        'Select a workspace in the microagent panel first.'
      );
      return false;
    }
    const notebook = kernelNotebook(this._workspaces.get(target));
    let kernel: KernelChoice | undefined;
    if (notebook && action !== 'start' && action !== 'delete') {
      kernel = await askKernelChoice(target, notebook, ACTION_LABELS[action]);
      if (!kernel) {
        return false;
      }
    } else if (action === 'kill' || action === 'delete') {
      const result = await showDialog({
        title: `${ACTION_LABELS[action]} workspace "${target}"?`,
        body:
          action === 'kill'
            ? 'The VM is terminated at once, without a clean shutdown: writes the guest has not flushed are lost.'
            : 'The workspace record, its rootfs and its console log are deleted. Its named volumes are released and kept.',
        buttons: [
          Dialog.cancelButton(),
          Dialog.warnButton({ label: ACTION_LABELS[action] })
        ]
      });
      if (!result.button.accept) {
        return false;
      }
    }
    this._pending.set(target, action);
    this._updatePending(target);
    try {
      if (action === 'delete') {
        await api.deleteWorkspace(target);
      } else {
        await api.action(target, action, kernel);
      }
      return true;
    } catch (error) {
      this._reportError(
        `Could not ${action} workspace "${target}": ${errorMessage(error)}`
      );
      return false;
    } finally {
      this._pending.delete(target);
      this._updatePending(target);
      await this.refresh();
    }
  }

  /** Upload or download one file (asks for the paths); errors are shown in the panel. */
  async transfer(
    name: string,
    fn: (name: string, dir: string) => Promise<string | null>
  ): Promise<void> {
    try {
      await fn(name, defaultDir(this._workspaces.get(name)?.owner?.writable ?? null));
    } catch (error) {
      this._reportError(`"${name}": ${errorMessage(error)}`);
    }
  }

  /** Bring a kernel VM's writable folder back into its notebook's folder; what came back is shown. */
  async syncFiles(name: string): Promise<void> {
    const kernelId = this._workspaces.get(name)?.owner?.kernelId;
    if (!kernelId) {
      return;
    }
    try {
      const answer = await api.syncKernel(kernelId);
      Notification.success(answer.message, { autoClose: 8000 });
    } catch (error) {
      this._reportError(`"${name}": ${errorMessage(error)}`);
    }
  }

  /** Create a volume; errors are shown (in the form when it was used, else in the panel). */
  async createVolume(name: string, sizeMiB?: number): Promise<boolean> {
    try {
      await api.createVolume(name, sizeMiB);
      return true;
    } catch (error) {
      this._reportError(
        `Could not create volume "${name}": ${errorMessage(error)}`
      );
      return false;
    } finally {
      await this.refresh();
    }
  }

  /** Delete a volume after confirmation (a second, forced confirmation while it is attached). */
  async deleteVolume(name: string): Promise<boolean> {
    const vol = this._volumes.get(name);
    const attached = vol?.attached;
    const result = await showDialog({
      title: `Delete volume "${name}"?`,
      body: attached
        ? `It is attached to workspace "${attached}". Its disk and all data on it are deleted. ` +
          'A volume held by a running workspace can only be deleted with "Force delete".'
        : 'Its disk and all data on it are deleted.',
      buttons: attached
        ? [
            Dialog.cancelButton(),
            Dialog.warnButton({ label: 'Delete' }),
            Dialog.warnButton({ label: 'Force delete' })
          ]
        : [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (!result.button.accept) {
      return false;
    }
    const force = result.button.label === 'Force delete';
    const row = this._volRows.get(name);
    if (row) {
      setDisabled(row.remove, true);
    }
    try {
      await api.deleteVolume(name, force);
      return true;
    } catch (error) {
      this._reportError(
        `Could not delete volume "${name}": ${errorMessage(error)}`
      );
      return false;
    } finally {
      if (row) {
        setDisabled(row.remove, false);
      }
      await this.refresh();
    }
  }

  /** Focus the create-volume form's name field. */
  focusVolumeForm(): void {
    this._volName.focus();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    window.clearTimeout(this._timer);
    this._log.dispose();
    Signal.clearData(this);
    super.dispose();
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    void this.refresh();
    this._schedule();
  }

  protected onBeforeDetach(msg: Message): void {
    window.clearTimeout(this._timer);
    super.onBeforeDetach(msg);
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this.refresh();
  }

  // ---- internals ------------------------------------------------------------------------------------
  private _schedule(): void {
    window.clearTimeout(this._timer);
    if (!this.isAttached) {
      return;
    }
    this._timer = window.setTimeout(async () => {
      // poll while visible; while hidden keep the state fresh for the commands at a slower pace
      if (this.isVisible || ++this._hiddenTicks % 5 === 0) {
        await this.refresh();
      }
      this._schedule();
    }, this._interval * 1000);
  }

  private async _refresh(): Promise<void> {
    const [ws, vols] = await Promise.allSettled([
      api.listWorkspaces(),
      api.listVolumes()
    ]);
    const errors: string[] = [];
    if (ws.status === 'fulfilled') {
      this._renderWorkspaces(ws.value);
    } else {
      errors.push(`Could not list workspaces: ${errorMessage(ws.reason)}`);
      if (!this._workspaces.size) {
        setText(this._wsEmpty, 'Workspaces unavailable.');
      }
    }
    if (vols.status === 'fulfilled') {
      this._renderVolumes(vols.value);
    } else {
      errors.push(`Could not list volumes: ${errorMessage(vols.reason)}`);
      if (!this._volumes.size) {
        setText(this._volEmpty, 'Volumes unavailable.');
      }
    }
    if (errors.length) {
      this._pollError = true;
      this.showError(errors.join('\n'));
    } else if (this._pollError) {
      this._pollError = false;
      this.clearError();
    }
    if (ws.status === 'fulfilled' && vols.status === 'fulfilled') {
      // volume lines of the workspaces depend on the volume list
      for (const w of ws.value) {
        this._updateWorkspaceRow(w);
      }
    }
    const selected = this._selected;
    if (selected && !this._workspaces.has(selected) && ws.status === 'fulfilled') {
      this.select(null);
    }
    if (!this._selected && ws.status === 'fulfilled' && ws.value.length) {
      const first = ws.value.find(w => isLive(w)) ?? ws.value[0];
      this.select(first.name);
    } else if (this._selected) {
      this._log.poke(isLive(this._workspaces.get(this._selected)));
    }
    this._refreshed.emit();
  }

  private _renderWorkspaces(list: IWorkspace[]): void {
    // named workspaces first, then one-shot runs (kept with --keep), each by name
    const sorted = [...list].sort(
      (a, b) => Number(!!a.oneShot) - Number(!!b.oneShot) || a.name.localeCompare(b.name)
    );
    this._workspaces = new Map(sorted.map(w => [w.name, w]));
    for (const [name, row] of this._wsRows) {
      if (!this._workspaces.has(name)) {
        row.node.remove();
        this._wsRows.delete(name);
      }
    }
    const nodes: HTMLElement[] = [];
    for (const w of sorted) {
      let row = this._wsRows.get(w.name);
      if (!row) {
        row = this._createWorkspaceRow(w.name);
        this._wsRows.set(w.name, row);
      }
      this._updateWorkspaceRow(w);
      nodes.push(row.node);
    }
    reorder(this._wsList, nodes);
    setHidden(this._wsEmpty, sorted.length > 0);
    setText(
      this._wsEmpty,
      'No workspaces. Create one with: microagent create NAME, or %microagent create in a notebook.'
    );
  }

  private _createWorkspaceRow(name: string): IWorkspaceRow {
    const node = el('li', 'ma-Row ma-WorkspaceRow');
    node.dataset.ws = name;
    node.setAttribute('role', 'option');
    node.setAttribute('aria-selected', String(name === this._selected));
    if (name === this._selected) {
      node.classList.add('ma-mod-selected');
    }
    node.addEventListener('click', event => {
      if (!(event.target as HTMLElement).closest('button')) {
        this.select(name);
      }
    });
    const top = el('div', 'ma-RowTop');
    const nameNode = el('span', 'ma-Name', name);
    nameNode.title = name;
    const badge = el('span', 'ma-Badge');
    const pending = el('span', 'ma-Pending');
    pending.hidden = true;
    top.append(nameNode, badge, pending);
    const meta = el('div', 'ma-Meta');
    const owner = el('div', 'ma-Owner');
    owner.hidden = true;
    const ready = el('div', 'ma-Readiness');
    const dots = SIGNALS.map(([, label]) => {
      const dot = el('span', 'ma-Signal', label);
      ready.append(dot);
      return dot;
    });
    const volumes = el('div', 'ma-WsVolumes');
    const blocked = el('div', 'ma-Blocked');
    blocked.hidden = true;
    const error = el('div', 'ma-RowError');
    error.hidden = true;
    const actions = el('div', 'ma-Actions');
    const buttons = new Map<PanelAction, HTMLButtonElement>();
    for (const action of ACTIONS) {
      const button = el(
        'button',
        `ma-Button ma-Action ma-Action-${action}`,
        ACTION_LABELS[action]
      );
      button.dataset.action = action;
      button.title = ACTION_HELP[action];
      button.addEventListener('click', () => {
        this.select(name);
        void this.runAction(action, name);
      });
      actions.append(button);
      buttons.set(action, button);
    }
    const files = el('div', 'ma-Actions ma-FileActions');
    for (const [label, help, fn] of [
      ['Upload…', 'Copy a file from this computer into the workspace', uploadTo],
      ['Download…', 'Save a file of the workspace on this computer', downloadFrom]
    ] as const) {
      const button = el('button', `ma-Button ma-File-${label.slice(0, -1).toLowerCase()}`, label);
      button.title = help;
      button.addEventListener('click', () => {
        this.select(name);
        void this.transfer(name, fn);
      });
      files.append(button);
    }
    const sync = el('button', 'ma-Button ma-File-sync', 'Sync files');
    sync.title = "Bring the kernel's writable folder back into the notebook's folder now (saving the notebook does too)";
    sync.hidden = true;
    sync.addEventListener('click', () => {
      this.select(name);
      void this.syncFiles(name);
    });
    files.append(sync);
    node.append(top, meta, owner, ready, volumes, blocked, error, actions, files);
    return {
      node,
      name: nameNode,
      badge,
      pending,
      meta,
      owner,
      dots,
      volumes,
      blocked,
      error,
      buttons,
      sync,
      key: ''
    };
  }

  private _updateWorkspaceRow(w: IWorkspace): void {
    const row = this._wsRows.get(w.name);
    if (!row) {
      return;
    }
    const vols = this._volumeLine(w);
    const key = JSON.stringify([w, vols]);
    if (key === row.key) {
      return; // nothing changed: leave the DOM alone
    }
    row.node.classList.toggle('ma-mod-oneShot', !!w.oneShot);
    row.node.title = w.oneShot ? 'one-shot run (remove stopped ones with %microagent prune)' : '';
    row.key = key;
    const state = String(w.state ?? 'unknown');
    setText(row.badge, state);
    setClass(row.badge, `ma-Badge ma-state-${state.replace(/[^a-z]/g, '')}`);
    setAttr(row.node, 'data-state', state);
    const res = w.resources ?? {};
    const parts = [
      w.accel ? `accel ${w.accel}` : '',
      w.profile ? `profile ${w.profile}` : '',
      res.memoryMiB ? `${res.memoryMiB} MiB` : '',
      res.cpuCount ? `${res.cpuCount} cpu` : '',
      res.sizeMiB ? `disk ${res.sizeMiB} MiB` : '',
      w.networkSummary ? `network ${w.networkSummary}` : ''
    ].filter(Boolean);
    setText(row.meta, parts.join(' · '));
    setAttr(
      row.meta,
      'title',
      [w.accelReason, w.networkSummary].filter(Boolean).map(String).join('\n')
    );
    const whose = ownerLine(w);
    setText(row.owner, whose);
    setHidden(row.owner, !whose);
    setHidden(row.sync, !(w.owner?.writable && w.owner.thisServer && w.owner.kernelId));
    SIGNALS.forEach(([key, label], i) => {
      const signal = w[key] as IReadiness | undefined;
      const dot = row.dots[i];
      const status = !signal
        ? 'unknown'
        : signal.error
          ? 'error'
          : signal.ready
            ? 'ready'
            : 'waiting';
      setClass(dot, `ma-Signal ma-signal-${status}`);
      setAttr(dot, 'data-signal', status);
      const detail = signal ? signal.error || signal.detail || '' : '';
      setAttr(
        dot,
        'title',
        `${label}: ${status === 'ready' ? 'ready' : status === 'error' ? 'error' : 'not ready'}` +
          (detail ? ` (${detail})` : '')
      );
    });
    setText(row.volumes, vols ? `volumes: ${vols}` : '');
    setHidden(row.volumes, !vols);
    this._renderBlocked(w.name, row.blocked, blockedNames(w));
    const err = w.error ? String(w.error) : '';
    setText(row.error, err);
    setHidden(row.error, !err);
    this._updatePending(w.name);
  }

  /** The refused names of a running workspace, each with an Allow button (asks first). */
  private _renderBlocked(
    name: string,
    box: HTMLElement,
    entries: string[]
  ): void {
    box.replaceChildren();
    setHidden(box, entries.length === 0);
    if (entries.length === 0) {
      return;
    }
    box.append(el('div', 'ma-BlockedTitle', 'refused (not on the allow-list):'));
    for (const entry of entries) {
      const line = el('div', 'ma-BlockedItem');
      line.dataset.entry = entry;
      const button = el('button', 'ma-Button ma-Allow', 'Allow');
      button.title = `Add ${entry} to the allow-list of ${name} (at once)`;
      button.addEventListener('click', () => {
        void this.allow(name, entry);
      });
      line.append(el('span', 'ma-BlockedName', entry), button);
      box.append(line);
    }
  }

  /** Add `entry` to a workspace's allow-list after asking; errors are shown in the panel. */
  async allow(name: string, entry: string): Promise<boolean> {
    const result = await showDialog({
      title: `Allow ${entry} for "${name}"?`,
      body:
        `Code in the workspace will be able to connect to ${entry} by name (TLS or HTTP to that port), ` +
        'from now on and at its next starts.',
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Allow' })]
    });
    if (!result.button.accept) {
      return false;
    }
    try {
      await api.allow(name, [entry]);
      return true;
    } catch (error) {
      this._reportError(
        `Could not allow ${entry} for "${name}": ${errorMessage(error)}`
      );
      return false;
    } finally {
      await this.refresh();
    }
  }

  /** "name → /mount" for the workspace's volumes: from its attachments, else from the volume holders. */
  private _volumeLine(w: IWorkspace): string {
    if (Array.isArray(w.attachments)) {
      return w.attachments
        .filter(a => a.kind === 'volume')
        .map(
          a => `${a.name} → ${a.mountpoint}${a.readOnly ? ' (ro)' : ''}`
        )
        .join(', ');
    }
    const names: string[] = [];
    for (const v of this._volumes.values()) {
      if (v.attached === w.name || (!v.attached && v.lastHolder === w.name)) {
        names.push(v.name);
      }
    }
    return names.join(', ');
  }

  private _updatePending(name: string): void {
    const row = this._wsRows.get(name);
    if (!row) {
      return;
    }
    const pending = this._pending.get(name);
    const ws = this._workspaces.get(name);
    setText(row.pending, pending ? PENDING[pending] : '');
    setHidden(row.pending, !pending);
    row.node.classList.toggle('ma-mod-busy', !!pending);
    for (const [action, button] of row.buttons) {
      setDisabled(button, !!pending || !actionAllowed(action, ws));
    }
  }

  private _renderVolumes(list: IVolume[]): void {
    const sorted = [...list].sort((a, b) => a.name.localeCompare(b.name));
    this._volumes = new Map(sorted.map(v => [v.name, v]));
    for (const [name, row] of this._volRows) {
      if (!this._volumes.has(name)) {
        row.node.remove();
        this._volRows.delete(name);
      }
    }
    const nodes: HTMLElement[] = [];
    for (const v of sorted) {
      let row = this._volRows.get(v.name);
      if (!row) {
        row = this._createVolumeRow(v.name);
        this._volRows.set(v.name, row);
      }
      const key = JSON.stringify(v);
      if (key !== row.key) {
        row.key = key;
        setText(row.size, `${v.sizeMiB} MiB`);
        if (v.attached) {
          setText(row.holder, v.attached);
          setAttr(row.holder, 'title', `attached to workspace "${v.attached}"`);
          setClass(row.holder, 'ma-Holder ma-mod-attached');
        } else if (v.lastHolder) {
          setText(row.holder, `last: ${v.lastHolder}`);
          setAttr(row.holder, 'title', `not attached; last held by "${v.lastHolder}"`);
          setClass(row.holder, 'ma-Holder ma-mod-released');
        } else {
          setText(row.holder, 'unattached');
          setAttr(row.holder, 'title', 'never attached');
          setClass(row.holder, 'ma-Holder ma-mod-free');
        }
      }
      nodes.push(row.node);
    }
    reorder(this._volList, nodes);
    setHidden(this._volEmpty, sorted.length > 0);
    setText(this._volEmpty, 'No volumes.');
  }

  private _createVolumeRow(name: string): IVolumeRow {
    const node = el('li', 'ma-Row ma-VolumeRow');
    node.dataset.vol = name;
    const nameNode = el('span', 'ma-Name', name);
    nameNode.title = name;
    const size = el('span', 'ma-Size');
    const holder = el('span', 'ma-Holder');
    const remove = el('button', 'ma-Button ma-Action ma-Action-delete', 'Delete');
    remove.title = `Delete volume "${name}" and its data`;
    remove.addEventListener('click', () => void this.deleteVolume(name));
    node.append(nameNode, size, holder, remove);
    return { node, size, holder, remove, key: '' };
  }

  private _buildVolumeForm(): HTMLFormElement {
    const form = el('form', 'ma-VolumeForm');
    form.noValidate = true;
    const title = el('div', 'ma-FormTitle', 'Create volume');
    this._volName = el('input', 'ma-Input ma-VolumeName');
    this._volName.name = 'name';
    this._volName.placeholder = 'name';
    this._volName.setAttribute('aria-label', 'Volume name');
    this._volName.autocomplete = 'off';
    this._volSize = el('input', 'ma-Input ma-VolumeSize');
    this._volSize.name = 'sizeMiB';
    this._volSize.type = 'number';
    this._volSize.min = '8';
    this._volSize.step = '1';
    this._volSize.value = '1024';
    this._volSize.setAttribute('aria-label', 'Size in MiB');
    const unit = el('span', 'ma-Unit', 'MiB');
    const submit = el('button', 'ma-Button ma-CreateVolume', 'Create');
    submit.type = 'submit';
    const error = el('div', 'ma-FormError');
    error.setAttribute('role', 'alert');
    error.hidden = true;
    const row = el('div', 'ma-FormRow');
    row.append(this._volName, this._volSize, unit, submit);
    form.append(title, row, error);
    form.addEventListener('submit', async event => {
      event.preventDefault();
      const name = this._volName.value.trim();
      const sizeText = this._volSize.value.trim();
      const size = sizeText ? Number(sizeText) : undefined;
      setHidden(error, true);
      if (!name) {
        setText(error, 'Give the volume a name.');
        setHidden(error, false);
        return;
      }
      if (size !== undefined && (!Number.isInteger(size) || size <= 0)) {
        setText(error, 'The size must be a whole number of MiB.');
        setHidden(error, false);
        return;
      }
      submit.disabled = true;
      try {
        await api.createVolume(name, size);
        this._volName.value = '';
      } catch (e) {
        setText(error, `Could not create volume "${name}": ${errorMessage(e)}`);
        setHidden(error, false);
      } finally {
        submit.disabled = false;
        await this.refresh();
      }
    });
    return form;
  }

  private _reportError(message: string): void {
    this.showError(message);
    if (!this.isVisible) {
      void showErrorMessage('microagent', message);
    }
  }

  private _interval = 2;
  private _timer = 0;
  private _hiddenTicks = 0;
  private _inflight: Promise<void> | null = null;
  private _pollError = false;
  private _selected: string | null = null;
  private _workspaces = new Map<string, IWorkspace>();
  private _volumes = new Map<string, IVolume>();
  private _wsRows = new Map<string, IWorkspaceRow>();
  private _volRows = new Map<string, IVolumeRow>();
  private _pending = new Map<string, PanelAction>();
  private _selectionChanged = new Signal<this, string | null>(this);
  private _refreshed = new Signal<this, void>(this);
  private readonly _refreshButton: HTMLButtonElement;
  private readonly _errorBox: HTMLElement;
  private readonly _errorText: HTMLElement;
  private readonly _wsEmpty: HTMLElement;
  private readonly _wsList: HTMLUListElement;
  private readonly _volEmpty: HTMLElement;
  private readonly _volList: HTMLUListElement;
  private readonly _log: LogView;
  private _volName!: HTMLInputElement;
  private _volSize!: HTMLInputElement;
}
