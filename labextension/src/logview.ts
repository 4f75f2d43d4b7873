/**
 * The serial-console view of one workspace: follows the server's chunked log stream, appends in place and
 * auto-scrolls unless the user scrolled up.
 */
import { api, errorMessage } from './request';

/** Most characters kept in the view; older output is trimmed from the top. */
const MAX_CHARS = 400_000;
// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r/g;

export class LogView {
  readonly node: HTMLElement;
  private readonly _title: HTMLElement;
  private readonly _pre: HTMLPreElement;
  private readonly _text: Text;
  private readonly _status: HTMLElement;
  private readonly _followButton: HTMLButtonElement;
  private _name: string | null = null;
  private _abort: AbortController | null = null;
  private _streaming = false;
  private _loaded = false;
  private _bytes = 0; // bytes of the log file already shown
  private _follow = true;
  private _autoTop = 0; // scrollTop where the view was last scrolled to the end by us
  private _generation = 0;

  constructor() {
    this.node = document.createElement('section');
    this.node.className = 'ma-Section ma-LogSection';
    const header = document.createElement('div');
    header.className = 'ma-SectionHeader';
    this._title = document.createElement('h3');
    this._title.textContent = 'Serial log';
    this._status = document.createElement('span');
    this._status.className = 'ma-LogStatus';
    this._followButton = document.createElement('button');
    this._followButton.className = 'ma-Button ma-FollowButton';
    this._followButton.textContent = 'Follow';
    this._followButton.title = 'Scroll to the end and follow new output';
    this._followButton.hidden = true;
    this._followButton.addEventListener('click', () => {
      this._follow = true;
      this._scrollToEnd();
      this._updateFollow();
    });
    header.append(this._title, this._status, this._followButton);
    this._pre = document.createElement('pre');
    this._pre.className = 'ma-Log';
    this._pre.tabIndex = 0;
    this._text = document.createTextNode('');
    this._pre.appendChild(this._text);
    this._pre.addEventListener('scroll', () => {
      // Scroll events arrive after the fact: one caused by our own scroll-to-end may land after more text
      // was appended. Only a move above where we last put the view is the user scrolling up.
      const atEnd =
        this._pre.scrollHeight - this._pre.scrollTop - this._pre.clientHeight <
        8;
      const userMovedUp = this._pre.scrollTop < this._autoTop - 4;
      const follow = atEnd || (this._follow && !userMovedUp);
      if (follow !== this._follow) {
        this._follow = follow;
        this._updateFollow();
      }
    });
    // the pane changes height as the lists above it grow or shrink: stay pinned to the end while following
    new ResizeObserver(() => {
      if (this._follow) {
        this._scrollToEnd();
      }
    }).observe(this._pre);
    this.node.append(header, this._pre);
    this._setPlaceholder('Select a workspace to see its serial console.');
  }

  get workspace(): string | null {
    return this._name;
  }

  /** Show the log of `name` (null: none). `running`: whether new output may come. */
  setWorkspace(name: string | null, running: boolean): void {
    if (name === this._name) {
      this.poke(running);
      return;
    }
    this._stop();
    this._name = name;
    this._bytes = 0;
    this._loaded = false;
    this._text.data = '';
    this._follow = true;
    this._autoTop = 0;
    this._updateFollow();
    this._title.textContent = name ? `Serial log: ${name}` : 'Serial log';
    this._pre.dataset.workspace = name ?? '';
    if (!name) {
      this._setPlaceholder('Select a workspace to see its serial console.');
      return;
    }
    this._setPlaceholder('');
    this.poke(running);
  }

  /** Called on every refresh: (re)connect the stream while the workspace runs or before the first load. */
  poke(running: boolean): void {
    if (this._name && !this._streaming && (running || !this._loaded)) {
      void this._open(this._name);
    }
  }

  dispose(): void {
    this._stop();
  }

  private _stop(): void {
    this._generation++;
    this._abort?.abort();
    this._abort = null;
    this._streaming = false;
  }

  private async _open(name: string): Promise<void> {
    const generation = ++this._generation;
    const abort = new AbortController();
    this._abort = abort;
    this._streaming = true;
    this._status.textContent = 'following';
    this._status.classList.remove('ma-mod-error');
    const skip = this._bytes; // the stream starts at the beginning of the file: skip what is shown
    let received = 0;
    try {
      const response = await api.logStream(name, abort.signal);
      const reader = response.body?.getReader();
      const decoder = new TextDecoder();
      if (!reader) {
        this._append(decoder.decode(new Uint8Array(await response.arrayBuffer())));
      } else {
        for (;;) {
          const { done, value } = await reader.read();
          if (done || generation !== this._generation) {
            break;
          }
          let chunk = value;
          if (received + chunk.length <= skip) {
            received += chunk.length;
            continue;
          }
          if (received < skip) {
            chunk = chunk.subarray(skip - received);
            received = skip;
          }
          received += chunk.length;
          this._bytes += chunk.length;
          this._append(decoder.decode(chunk, { stream: true }));
        }
      }
      if (generation !== this._generation) {
        return;
      }
      if (received < skip) {
        // the log file is shorter than what is shown: it was replaced (workspace re-created); start over
        this._bytes = 0;
        this._text.data = '';
      }
      this._loaded = true;
      this._status.textContent = '';
      if (!this._text.data) {
        this._setPlaceholder('(no console output yet)');
      }
    } catch (error) {
      if (generation !== this._generation || abort.signal.aborted) {
        return;
      }
      this._loaded = true;
      this._status.textContent = errorMessage(error);
      this._status.classList.add('ma-mod-error');
    } finally {
      if (generation === this._generation) {
        this._streaming = false;
        this._abort = null;
      }
    }
  }

  private _append(text: string): void {
    text = text.replace(ANSI, '');
    if (!text) {
      return;
    }
    this._setPlaceholder('');
    this._text.appendData(text);
    if (this._text.length > MAX_CHARS) {
      const cut = this._text.data.indexOf('\n', this._text.length - MAX_CHARS);
      this._text.deleteData(0, cut > 0 ? cut + 1 : this._text.length - MAX_CHARS);
    }
    if (this._follow) {
      this._scrollToEnd();
    }
  }

  private _scrollToEnd(): void {
    this._pre.scrollTop = this._pre.scrollHeight;
    this._autoTop = this._pre.scrollTop;
  }

  private _updateFollow(): void {
    this._followButton.hidden = this._follow;
    this._pre.classList.toggle('ma-mod-paused', !this._follow);
  }

  private _setPlaceholder(text: string): void {
    if (this._pre.dataset.placeholder !== text) {
      this._pre.dataset.placeholder = text;
    }
  }
}
