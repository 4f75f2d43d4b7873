/**
 * Upload a file into a workspace and download one out of it (the REST `files` route: the engine's cp with its
 * rules and byte cap). A download is saved by the browser, never shown: the server sends it as an attachment.
 */
import { InputDialog, Notification } from '@jupyterlab/apputils';

import { api } from './request';

/** Where an upload goes when the user keeps the default: the kernel's writable folder when it has one (it comes
 * back to the notebook's folder), else root's home (a sandboxed kernel's /notebook is a read-only copy). */
export function defaultDir(writable: string | null): string {
  return writable ? `${writable.replace(/\/+$/, '')}/` : '/root/';
}

/** Ask for a local file and a guest path; upload. The guest path, or null when cancelled. */
export async function uploadTo(name: string, dir: string): Promise<string | null> {
  const file = await pickFile();
  if (!file) {
    return null;
  }
  const answer = await InputDialog.getText({
    title: `Upload ${file.name} to "${name}"`,
    label: 'Path in the workspace',
    text: dir + file.name
  });
  if (!answer.button.accept || !answer.value) {
    return null;
  }
  const where = `${name}:${answer.value}`;
  const id = Notification.emit(
    `Uploading ${file.name} to ${where}…`,
    'in-progress',
    { autoClose: false }
  );
  try {
    await api.upload(name, answer.value, file);
  } catch (error) {
    Notification.dismiss(id); // the panel shows the error
    throw error;
  }
  Notification.update({
    id,
    message: `Uploaded ${file.name} to ${where}`,
    type: 'success',
    autoClose: 6000
  });
  return answer.value;
}

/** Ask for a guest path; download that file through the browser. The path, or null when cancelled. */
export async function downloadFrom(name: string, dir: string): Promise<string | null> {
  const answer = await InputDialog.getText({
    title: `Download a file from "${name}"`,
    label: 'Path in the workspace',
    text: dir
  });
  if (!answer.button.accept || !answer.value) {
    return null;
  }
  const blob = await api.download(name, answer.value);
  const url = URL.createObjectURL(
    new Blob([blob], { type: 'application/octet-stream' })
  );
  const link = document.createElement('a');
  link.href = url;
  link.download = answer.value.split('/').pop() || 'download';
  link.rel = 'noopener';
  document.body.append(link);
  link.click();
  link.remove();
  window.setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return answer.value;
}

function pickFile(): Promise<File | null> {
  return new Promise(resolve => {
    const input = document.createElement('input');
    input.type = 'file';
    input.className = 'ma-FilePicker';
    input.hidden = true;
    input.addEventListener('change', () => {
      resolve(input.files?.[0] ?? null);
      input.remove();
    });
    input.addEventListener('cancel', () => {
      resolve(null);
      input.remove();
    });
    document.body.append(input);
    input.click();
  });
}
