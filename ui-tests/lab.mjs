// What the browser tests share: their environment, Chromium (Debian's, through playwright-core; never a
// downloaded browser), progress lines, screenshots and waiting on the page. Used by panel.spec.mjs and
// sandbox.spec.mjs, run with plain `node` by tests/test_labextension.py and tests/test_sandbox_browser.py.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The environment variable `name`, or exit 2 naming it (`spec` names the script). */
export function must(spec, name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${spec}: set ${name}`);
    process.exit(2);
  }
  return value;
}

/**
 * Chromium with a fresh profile and one page, plus the script's helpers: `log` and `step` (progress lines, kept
 * in `result.steps`), `shot` (a screenshot in $SCREENSHOTS), `until` (wait for a page function) and `finish`
 * (print the last line `RESULT {...}` and exit 0 only when `result.ok`).
 */
export async function openBrowser(spec, { timeout = 30_000, result = {} } = {}) {
  const exe = process.env.CHROMIUM || '/usr/bin/chromium';
  if (!fs.existsSync(exe)) {
    console.error(`${spec}: no browser at ${exe}; install it with: apt-get install -y chromium`);
    process.exit(3);
  }
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch {
    console.error(`${spec}: playwright-core is missing; install it with: cd ui-tests && npm ci`);
    process.exit(3);
  }
  const shots = process.env.SCREENSHOTS || path.join(here, 'screenshots');
  fs.mkdirSync(shots, { recursive: true });
  const t0 = Date.now();
  const log = msg => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ma-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: exe,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 900 }
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(timeout);
  Object.assign(result, { ok: false, steps: result.steps ?? [] });
  const step = name => {
    result.steps.push(name);
    log(name);
  };
  const shot = async name => {
    const file = path.join(shots, name);
    await page.screenshot({ path: file });
    return file;
  };
  /** Wait until `fn(arg)` evaluated in the page is truthy; fail naming `what`. */
  const until = async (what, fn, arg, wait = timeout) => {
    try {
      await page.waitForFunction(fn, arg, { timeout: wait, polling: 100 });
    } catch {
      throw new Error(`timed out waiting for ${what}`);
    }
  };
  const finish = async () => {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
    console.log(`RESULT ${JSON.stringify(result)}`);
    process.exit(result.ok ? 0 : 1);
  };
  return { page, context, log, step, shot, until, finish, result, shots };
}
