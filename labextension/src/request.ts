/**
 * Thin client of the microagent REST API served by the jupyter-server extension
 * under `<base_url>/microagent/api/`.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IWorkspaceSpec } from './workspaceSpec';

/** A readiness signal of a workspace (guestReady, execReady, shellReady, mediationReady). */
export interface IReadiness {
  ready: boolean;
  observedAt?: string;
  detail?: string;
  error?: string;
}

/** An attachment of a workspace, as a workspace request and the status JSON hold it (generated types). */
export type IAttachment = NonNullable<IWorkspaceSpec['attachments']>[number];

/** The status JSON of one workspace (`WorkspaceInfo.to_json()`); only the fields the panel uses. */
export interface IWorkspace {
  name: string;
  state: string;
  /** made by `run` under a generated name; listed after the named workspaces, removed by `prune` */
  oneShot?: boolean;
  accel?: string | null;
  accelReason?: string | null;
  profile?: string | null;
  image?: string | null;
  resources?: { memoryMiB?: number; cpuCount?: number; sizeMiB?: number };
  guestReady?: IReadiness;
  execReady?: IReadiness;
  shellReady?: IReadiness;
  mediationReady?: IReadiness;
  attachments?: IAttachment[];
  error?: string | null;
  exitDetail?: string | null;
  /** the network policy in one line (what the guest can reach) */
  networkSummary?: string;
  /** the actions the engine accepts in the current state */
  actions?: string[];
  /** a supervisor (and usually a VM) is alive */
  live?: boolean;
  /** while it runs: what its DNS and egress proxy did, and the recent refusals */
  egress?: IEgressReport | null;
  /** a session's VM: whose (a notebook's sandboxed kernel, a `%%microagent python` session, a build) */
  owner?: IOwner | null;
  /** while it runs: CPU seconds and resident MiB of its VM process */
  usage?: { cpuSeconds: number; rssMiB: number } | null;
  [key: string]: unknown;
}

/** Who a session workspace belongs to. */
export interface IOwner {
  kind: 'kernel' | 'session' | 'build' | 'pool' | string;
  kernelId?: string;
  /** the notebook's path under the server's root (a kernel's) */
  notebook?: string;
  /** the kernel runs in this server (so actions go through it) */
  thisServer?: boolean;
  alive?: boolean;
  /** the kernel's writable folder in the guest (its files come back to the notebook's folder) */
  writable?: string;
}

/** One sandboxed kernel of this server: its launch's preparation steps and its VM. */
export interface IKernelEntry {
  kernelId: string;
  notebook: string | null;
  workspace: string | null;
  phase: 'preparing' | 'ready' | 'failed';
  steps: { t: number; message: string }[];
  startedAt: number;
  error: string | null;
}

/** What becomes of the kernel when its VM is halted, stopped or killed. */
export type KernelChoice = 'restart' | 'shutdown';

/** One connection the egress proxy refused (the name is the guest's, shown as text only). */
export interface IBlocked {
  name: string;
  address?: string | null;
  port?: number | null;
  reason: string;
  at?: number;
}

/** The DNS and egress counters of a running workspace (`status --json`'s `egress`). */
export interface IEgressReport {
  dns?: { [counter: string]: number };
  egress?: {
    allowed?: number;
    blocked?: number;
    recentBlocked?: IBlocked[];
    [counter: string]: unknown;
  } | null;
}

/** The JSON of one named volume. */
export interface IVolume {
  name: string;
  sizeMiB: number;
  path?: string;
  createdAt?: string;
  attached?: string | null;
  lastHolder?: string | null;
}

export type WorkspaceAction = 'start' | 'halt' | 'stop' | 'kill';

/** An error answered by the server, with its message in words (never a stack trace). */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly type?: string
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

/** The URL of an API path (segments are URL-encoded). */
export function apiUrl(
  settings: ServerConnection.ISettings,
  ...segments: string[]
): string {
  return URLExt.join(
    settings.baseUrl,
    'microagent',
    'api',
    ...segments.map(s => encodeURIComponent(s))
  );
}

/** Turn a failed response into an ApiError carrying the server's `error` message. */
async function toError(response: Response): Promise<ApiError> {
  let message = '';
  let type: string | undefined;
  const text = await response.text().catch(() => '');
  try {
    const data = JSON.parse(text);
    if (data && typeof data === 'object') {
      message = data.error || data.message || data.reason || '';
      type = data.type;
    }
  } catch {
    // not JSON: tornado's default error page or a proxy's; do not show HTML
  }
  if (!message) {
    message =
      response.status === 404
        ? 'The microagent API is not available on this server (is the microagent_jupyter server extension enabled?)'
        : `The server answered ${response.status} ${response.statusText}`.trim();
  }
  return new ApiError(message, response.status, type);
}

/** Send a request; resolve to the Response when it is OK, else reject with an ApiError. */
export async function requestRaw(
  path: string[],
  init: RequestInit = {},
  query = ''
): Promise<Response> {
  const settings = ServerConnection.makeSettings();
  const url = apiUrl(settings, ...path) + query;
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    if ((error as Error)?.name === 'AbortError') {
      throw error;
    }
    throw new ApiError(
      `Cannot reach the Jupyter server: ${(error as Error)?.message ?? error}`,
      0
    );
  }
  if (!response.ok) {
    throw await toError(response);
  }
  return response;
}

/** Send a request and parse its JSON answer. */
export async function requestAPI<T>(
  path: string[],
  init: RequestInit = {},
  query = ''
): Promise<T> {
  const response = await requestRaw(path, init, query);
  const text = await response.text();
  if (!text) {
    return undefined as unknown as T;
  }
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new ApiError('The server sent an answer that is not JSON', 0);
  }
}

function jsonInit(method: string, body?: unknown): RequestInit {
  return {
    method,
    body: body === undefined ? undefined : JSON.stringify(body),
    headers:
      body === undefined ? undefined : { 'Content-Type': 'application/json' }
  };
}

export const api = {
  listWorkspaces: (): Promise<IWorkspace[]> =>
    requestAPI<IWorkspace[]>(['workspaces']),
  getWorkspace: (name: string): Promise<IWorkspace> =>
    requestAPI<IWorkspace>(['workspaces', name]),
  action: (
    name: string,
    action: WorkspaceAction,
    kernel?: KernelChoice
  ): Promise<IWorkspace> =>
    requestAPI<IWorkspace>(
      ['workspaces', name, action],
      jsonInit('POST', kernel ? { kernel } : undefined)
    ),
  kernels: (): Promise<IKernelEntry[]> =>
    requestAPI<IKernelEntry[]>(['kernels']),
  /** Bring a sandboxed kernel's writable folder back into its notebook's folder now. */
  syncKernel: (kernelId: string): Promise<{ message: string }> =>
    requestAPI<{ message: string }>(
      ['kernels', kernelId, 'sync'],
      jsonInit('POST')
    ),
  /** Upload one file to `path` in the workspace (the engine's cp rules and byte cap). */
  upload: (name: string, path: string, data: Blob): Promise<unknown> =>
    requestAPI(
      ['workspaces', name, 'files'],
      { method: 'PUT', body: data },
      `?path=${encodeURIComponent(path)}`
    ),
  /** One file of the workspace, as bytes (never rendered). */
  download: (name: string, path: string): Promise<Blob> =>
    requestRaw(
      ['workspaces', name, 'files'],
      {},
      `?path=${encodeURIComponent(path)}`
    ).then(r => r.blob()),
  /** Widen a workspace's allow-list (at once when it runs). */
  allow: (name: string, entries: string[]): Promise<IWorkspace> =>
    requestAPI<IWorkspace>(
      ['workspaces', name, 'egress'],
      jsonInit('POST', { allow: entries })
    ),
  deleteWorkspace: (name: string): Promise<unknown> =>
    requestAPI(['workspaces', name], jsonInit('DELETE')),
  logs: (name: string, tail: number): Promise<string> =>
    requestRaw(['workspaces', name, 'logs'], {}, `?tail=${tail}`).then(r =>
      r.text()
    ),
  /** The chunked log stream: the log so far, then new output while the workspace runs. */
  logStream: (name: string, signal: AbortSignal): Promise<Response> =>
    requestRaw(['workspaces', name, 'logs', 'stream'], { signal }),
  listVolumes: (): Promise<IVolume[]> => requestAPI<IVolume[]>(['volumes']),
  createVolume: (name: string, sizeMiB?: number): Promise<IVolume> =>
    requestAPI<IVolume>(
      ['volumes'],
      jsonInit('POST', sizeMiB ? { name, sizeMiB } : { name })
    ),
  deleteVolume: (name: string, force = false): Promise<unknown> =>
    requestAPI(['volumes', name], jsonInit('DELETE'), force ? '?force=1' : '')
};

/** A message for the user from anything thrown: the server's words, never a stack trace. */
export function errorMessage(error: unknown): string {
  if (error instanceof ApiError) {
    return error.message;
  }
  if (error instanceof Error) {
    return error.message || error.name;
  }
  return String(error);
}
