/**
 * A notebook kernel's VM is halted, stopped or killed through its kernel: the panel asks what becomes of the
 * kernel (restart in a new VM, or shut down) instead of pulling the VM from under the notebook.
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';

import { IWorkspace, KernelChoice } from './request';

/** The notebook a workspace serves as a sandboxed kernel's VM (null: not one, or not this server's kernel). */
export function kernelNotebook(ws: IWorkspace | undefined): string | null {
  const owner = ws?.owner;
  if (!owner || owner.kind !== 'kernel' || !owner.thisServer) {
    return null;
  }
  return owner.notebook || 'a notebook';
}

/** One line for the card: whose session VM this is. */
export function ownerLine(ws: IWorkspace): string {
  const owner = ws.owner;
  if (!owner) {
    return '';
  }
  if (owner.kind === 'kernel') {
    return `kernel of ${owner.notebook || 'a notebook'}` + (owner.thisServer ? '' : ' (another server)');
  }
  if (owner.kind === 'session') {
    return 'a notebook\'s %%microagent python session';
  }
  if (owner.kind === 'build') {
    return 'building the warm Python snapshot';
  }
  if (owner.kind === 'pool') {
    return 'ready for the next sandboxed kernel (warm pool)';
  }
  return '';
}

/**
 * Ask what becomes of the kernel of `notebook` when its VM `name` is halted, stopped or killed: undefined when
 * the user cancels.
 */
export async function askKernelChoice(
  name: string,
  notebook: string,
  actionLabel: string
): Promise<KernelChoice | undefined> {
  const result = await showDialog({
    title: `${actionLabel} "${name}"?`,
    body:
      `This VM runs the kernel of ${notebook}. Its variables are lost either way. ` +
      'Restart gives the notebook a fresh kernel in a new VM; Shut Down stops the kernel and removes the VM.',
    buttons: [
      Dialog.cancelButton(),
      Dialog.warnButton({ label: 'Shut Down Kernel', displayType: 'warn' }),
      Dialog.okButton({ label: 'Restart Kernel' })
    ]
  });
  if (!result.button.accept) {
    return undefined;
  }
  return result.button.label === 'Restart Kernel' ? 'restart' : 'shutdown';
}
