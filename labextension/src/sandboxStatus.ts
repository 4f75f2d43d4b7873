/**
 * The sandbox made visible: a status bar item for the current notebook when its kernel runs in a microVM (the VM,
 * its network policy, memory and live CPU and memory use), and a notification with the steps while a sandboxed
 * kernel is being prepared (building the Python image or the warm snapshot, booting), instead of a bare
 * "Initializing". Polls `GET /microagent/api/kernels` (this server's board) and the VM's status.
 */
import { Notification } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { api, IKernelEntry, IWorkspace } from './request';

/** Seconds between polls. */
const POLL_SECONDS = 2;

/** The duck-typed part of a notebook panel this item reads (no dependency on @jupyterlab/notebook). */
export interface INotebookLike {
  context?: { path?: string };
  sessionContext?: { session?: { kernel?: { id?: string } | null } | null };
}

/** The status line of a sandboxed kernel's VM: "sandbox nbk-… · isolated · 512 MiB · CPU 3% · 120 MiB". */
export function statusLine(
  ws: IWorkspace,
  cpuPercent: number | null
): string {
  const parts = [`sandbox ${ws.name}`];
  if (ws.state !== 'running') {
    parts.push(ws.state);
  }
  if (ws.networkSummary) {
    parts.push(`network ${ws.networkSummary}`);
  }
  if (ws.resources?.memoryMiB) {
    parts.push(`${ws.resources.memoryMiB} MiB`);
  }
  if (cpuPercent !== null) {
    parts.push(`CPU ${Math.round(cpuPercent)}%`);
  }
  if (ws.usage?.rssMiB) {
    parts.push(`uses ${Math.round(ws.usage.rssMiB)} MiB`);
  }
  return parts.join(' · ');
}

/** The latest step of a launch, as one line. */
export function preparingLine(entry: IKernelEntry): string {
  const last = entry.steps[entry.steps.length - 1];
  const what = last ? last.message : 'starting the sandbox';
  const seconds = Math.max(0, Math.round(Date.now() / 1000 - entry.startedAt));
  return `Preparing the sandbox for ${entry.notebook ?? 'a notebook'} (${seconds} s): ${what}`;
}

export class SandboxStatus extends Widget {
  constructor(current: () => INotebookLike | null) {
    super();
    this._current = current;
    this.addClass('ma-SandboxStatus');
    this.node.title = 'microagent: the microVM this notebook\'s kernel runs in';
    this.hide();
  }

  /** Begin polling (call once). */
  start(): void {
    void this._poll();
  }

  /** Re-read at once (the current notebook changed). */
  poke(): void {
    window.clearTimeout(this._timer);
    void this._poll();
  }

  dispose(): void {
    window.clearTimeout(this._timer);
    super.dispose();
  }

  private async _poll(): Promise<void> {
    try {
      const entries = await api.kernels();
      this._notify(entries);
      await this._render(entries);
    } catch {
      this.hide(); // no microagent API on this server, or it is down: show nothing
    }
    if (!this.isDisposed) {
      this._timer = window.setTimeout(() => void this._poll(), POLL_SECONDS * 1000);
    }
  }

  /** One notification per launch that shows preparation steps: updated in place, closed when ready. */
  private _notify(entries: IKernelEntry[]): void {
    for (const entry of entries) {
      const id = this._notes.get(entry.kernelId);
      if (entry.phase === 'preparing' && entry.steps.length > 0) {
        const message = preparingLine(entry);
        if (id === undefined) {
          this._notes.set(entry.kernelId, Notification.emit(message, 'in-progress', { autoClose: false }));
        } else {
          Notification.update({ id, message, type: 'in-progress', autoClose: false });
        }
      } else if (id !== undefined && entry.phase !== 'preparing') {
        const failed = entry.phase === 'failed';
        Notification.update({
          id,
          message: failed
            ? `The sandbox for ${entry.notebook ?? 'a notebook'} did not start: ${entry.error ?? ''}`
            : `The sandbox for ${entry.notebook ?? 'a notebook'} is ready (${entry.workspace ?? ''})`,
          type: failed ? 'error' : 'success',
          autoClose: failed ? false : 4000
        });
        this._notes.delete(entry.kernelId);
      }
    }
  }

  private async _render(entries: IKernelEntry[]): Promise<void> {
    const nb = this._current();
    const path = nb?.context?.path;
    const kernelId = nb?.sessionContext?.session?.kernel?.id;
    const entry =
      entries.find(e => kernelId && e.kernelId === kernelId) ??
      entries.find(e => path && e.notebook === path && e.phase === 'preparing');
    if (!entry) {
      this.hide();
      return;
    }
    if (entry.phase !== 'ready' || !entry.workspace) {
      this._show(entry.phase === 'failed' ? 'sandbox failed to start' : preparingLine(entry), entry.phase);
      return;
    }
    const ws = await api.getWorkspace(entry.workspace);
    const now = Date.now() / 1000;
    let cpu: number | null = null;
    const seconds = ws.usage?.cpuSeconds;
    if (typeof seconds === 'number' && this._last && this._last.name === ws.name && now > this._last.at) {
      cpu = (100 * Math.max(0, seconds - this._last.cpu)) / (now - this._last.at);
    }
    this._last = typeof seconds === 'number' ? { name: ws.name, cpu: seconds, at: now } : null;
    this._show(statusLine(ws, cpu), ws.state);
  }

  private _show(text: string, state: string): void {
    if (this.node.textContent !== text) {
      this.node.textContent = text;
    }
    this.node.dataset.state = state;
    this.show();
  }

  private _current: () => INotebookLike | null;
  private _timer = 0;
  private _notes = new Map<string, string>();
  private _last: { name: string; cpu: number; at: number } | null = null;
}
