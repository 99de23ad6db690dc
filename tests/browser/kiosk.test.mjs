// Browser test of the kiosk page (/kiosk) against a running Carrel gateway.
//
//   cd tests/browser && npm ci
//   CARREL_URL=http://127.0.0.1:8080 KIOSK_KEY=crl_... CARD=... PIN=... node kiosk.test.mjs
//
// CHROMIUM overrides the browser (default /usr/bin/chromium). Plain Node, no test runner:
// each step asserts with a message and the script exits non-zero on the first failure.
// No fixed sleeps: every wait polls the page (Playwright auto-waiting or page.waitForFunction),
// and the idle sign-out is reached with Playwright's fake clock.

import assert from 'node:assert/strict';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`kiosk: FAIL: environment variable ${name} is not set`);
    process.exit(2);
  }
  return v;
};
const BASE = env('CARREL_URL').replace(/\/+$/, '');
const KIOSK_KEY = env('KIOSK_KEY');
const CARD = env('CARD');
const PIN = env('PIN');
const QUESTION = 'What can I borrow from the library besides books?';
const STEP_TIMEOUT_MS = 20_000;
const WHOLE_RUN_TIMEOUT_MS = 180_000;

let currentStep = 'start';
const step = (name) => {
  currentStep = name;
  console.log(`kiosk: ${name}`);
};

// Whole-run guard (Node's own timer, unaffected by the page's fake clock).
const guard = setTimeout(() => {
  console.error(`kiosk: FAIL: timed out after ${WHOLE_RUN_TIMEOUT_MS / 1000}s during "${currentStep}"`);
  process.exit(1);
}, WHOLE_RUN_TIMEOUT_MS);
guard.unref();

// First number in a text such as "12,345 of 20,000 tokens left today" (or "Quedan 12.345 de ...").
function tokensLeft(text) {
  const m = /\d[\d.,\u00a0\u202f ]*/.exec(text || '');
  return m ? Number(m[0].replace(/\D/g, '')) : NaN;
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const problems = []; // CSP violations and uncaught page errors
  let page;
  const assertNoProblems = () =>
    assert.ok(problems.length === 0, `the page reported problems:\n  ${problems.join('\n  ')}`);
  try {
    const context = await browser.newContext({ locale: 'en-US' });
    page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT_MS);

    page.on('console', (msg) => {
      const text = msg.text();
      if (/Content[- ]Security[- ]Policy|Refused to (load|execute|apply|connect)/i.test(text)) {
        problems.push(`CSP violation (console): ${text}`);
      }
    });
    page.on('pageerror', (e) => problems.push(`uncaught page error: ${e.message}`));
    // Also catch violations that never reach the console (reported via the DOM event).
    await page.addInitScript(() => {
      document.addEventListener('securitypolicyviolation', (e) => {
        console.error(`Content Security Policy violation: ${e.violatedDirective} blocked ${e.blockedURI}`);
      });
    });

    const assetTypes = {};
    page.on('response', (r) => {
      const p = new URL(r.url()).pathname;
      if (p === '/kiosk/kiosk.js' || p === '/kiosk/kiosk.css') assetTypes[p] = r.headers()['content-type'] || '';
    });

    // 1. Set-up link: the key is stored and the fragment removed; the sign-in form shows.
    step('1 open the set-up link');
    await page.clock.install();
    const response = await page.goto(`${BASE}/kiosk#key=${encodeURIComponent(KIOSK_KEY)}`);
    assert.ok(response, 'no response for /kiosk');
    assert.equal(response.status(), 200, `GET /kiosk answered ${response.status()}`);
    const headers = response.headers();
    assert.match(headers['content-type'] || '', /^text\/html/, `GET /kiosk Content-Type is "${headers['content-type']}"`);
    const csp = headers['content-security-policy'] || '';
    for (const directive of ["default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"]) {
      assert.ok(csp.includes(directive), `GET /kiosk Content-Security-Policy lacks "${directive}": "${csp}"`);
    }
    await page.locator('#signin-form').waitFor({ state: 'visible' });
    await page.waitForFunction(() => location.hash === '');
    assert.ok(!page.url().includes('#'), `the fragment is still in the URL: ${page.url()}`);
    assert.ok(!page.url().includes(KIOSK_KEY), 'the kiosk key is still in the URL');
    const storedKey = await page.evaluate(() => localStorage.getItem('carrel.kioskKey'));
    assert.equal(storedKey, KIOSK_KEY, 'the kiosk key was not stored in localStorage["carrel.kioskKey"]');
    assert.ok(await page.locator('#setup-form').isHidden(), 'the staff set-up form shows although a key is stored');
    assert.match(assetTypes['/kiosk/kiosk.js'] || '', /javascript/, `kiosk.js Content-Type is "${assetTypes['/kiosk/kiosk.js']}"`);
    assert.match(assetTypes['/kiosk/kiosk.css'] || '', /^text\/css/, `kiosk.css Content-Type is "${assetTypes['/kiosk/kiosk.css']}"`);
    assertNoProblems();

    // 2. Sign in with the keyboard only: Tab from where the page put focus to the card field.
    step('2 sign in with the keyboard');
    const visited = [];
    for (let i = 0; i < 15; i++) {
      const id = await page.evaluate(() => document.activeElement && document.activeElement.id);
      if (id === 'card') break;
      visited.push(id || '(none)');
      await page.keyboard.press('Tab');
    }
    assert.equal(await page.evaluate(() => document.activeElement.id), 'card',
      `Tab never reached the card field; focus went through: ${visited.join(' -> ')}`);
    await page.keyboard.type(CARD);
    await page.keyboard.press('Tab');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'pin', 'Tab from the card field did not reach the PIN field');
    await page.keyboard.type(PIN);
    await page.keyboard.press('Enter');
    // Signed in, or an error on the sign-in form, or (kiosk key refused) back at the staff set-up.
    await page.waitForFunction(() => {
      const shown = (id) => {
        const e = document.getElementById(id);
        return e && !e.hidden && e.getClientRects().length > 0;
      };
      return shown('chat-form') || (shown('signin-error') && !document.getElementById('signin-button').disabled)
        || shown('setup-form');
    });
    const setupError = await page.locator('#setup-error').evaluate((e) => (e.hidden ? '' : e.textContent.trim()));
    assert.ok(await page.locator('#setup-form').isHidden(), `the kiosk key was refused; the page asks for set-up: "${setupError}"`);
    const signinError = await page.locator('#signin-error').evaluate((e) => (e.hidden ? '' : e.textContent.trim()));
    assert.ok(signinError === '', `sign-in failed: "${signinError}"`);
    assert.ok(await page.locator('#chat-form').isVisible(), 'the chat form is not shown after sign-in');
    assert.ok(await page.locator('#signin-form').isHidden(), 'the sign-in form is still shown after sign-in');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'prompt', 'focus did not move to the message box after sign-in');
    const idleSeconds = Number(await page.locator('body').getAttribute('data-idle-timeout'));
    assert.ok(Number.isFinite(idleSeconds) && idleSeconds >= 30, `body[data-idle-timeout] is "${idleSeconds}"`);

    // 3. Ask a question; the answer streams in.
    step('3 ask a question and watch the answer stream');
    await page.waitForFunction(() => /\d|No daily limit/.test(document.getElementById('meter-text').textContent));
    const meterBefore = (await page.locator('#meter-text').textContent()).trim();
    const leftBefore = tokensLeft(meterBefore);
    assert.ok(Number.isFinite(leftBefore), `the meter shows no number of tokens left: "${meterBefore}" (this test needs a daily limit)`);
    await page.keyboard.type(QUESTION);
    await page.keyboard.press('Enter');
    await page.locator('#transcript .msg.user').first().waitFor();
    assert.equal((await page.locator('#transcript .msg.user .text').first().textContent()).trim(), QUESTION,
      'the question does not show in the transcript');
    // Poll the answer's length until two different non-empty lengths were seen (or it finished).
    const growth = await page.waitForFunction(() => {
      const msg = document.querySelector('#transcript .msg.assistant');
      if (!msg) return false;
      const len = msg.querySelector('.text').textContent.length;
      const seen = (window.__kioskSeenLengths = window.__kioskSeenLengths || []);
      if (len > 0 && !seen.includes(len)) seen.push(len);
      if (seen.length >= 2 || msg.dataset.state === 'done') return { seen: seen.slice(), state: msg.dataset.state };
      return false;
    }, null, { polling: 10 });
    const { seen, state } = await growth.jsonValue();
    assert.ok(seen.length >= 2,
      `the answer did not stream: saw lengths [${seen.join(', ')}] before it was ${state} (expected two different non-empty lengths)`);
    await page.waitForFunction(() => {
      const msg = document.querySelector('#transcript .msg.assistant');
      return msg && msg.dataset.state === 'done' && !document.getElementById('send').disabled;
    });
    const answer = (await page.locator('#transcript .msg.assistant .text').first().textContent()).trim();
    assert.ok(answer.length > seen[0], `the finished answer ("${answer}") is no longer than its first piece`);
    const chatError = await page.locator('#chat-error').evaluate((e) => (e.hidden ? '' : e.textContent.trim()));
    assert.equal(chatError, '', `the chat shows an error: "${chatError}"`);

    // 4. The meter goes down.
    step('4 the meter shows fewer tokens left');
    await page.waitForFunction(
      (before) => {
        const m = /\d[\d.,\u00a0\u202f ]*/.exec(document.getElementById('meter-text').textContent);
        return m && Number(m[0].replace(/\D/g, '')) < before;
      },
      leftBefore,
    ).catch(async () => {
      const now = await page.locator('#meter-text').textContent();
      assert.fail(`the meter did not go down after an answer: before "${meterBefore}", now "${now}"`);
    });
    const meterValue = await page.locator('#meter').evaluate((m) => Number(m.value ?? m.getAttribute('aria-valuenow')));
    assert.ok(meterValue < leftBefore, `#meter's value (${meterValue}) did not go down from ${leftBefore}`);

    // 5. Large text and language.
    step('5 large text and Spanish');
    await page.locator('#large-text').focus();
    await page.keyboard.press('Space');
    await page.waitForFunction(() => document.getElementById('large-text').getAttribute('aria-pressed') === 'true');
    assert.ok(await page.evaluate(() => document.documentElement.classList.contains('large-text')),
      'large text is pressed but <html> has no "large-text" class');
    assert.equal(await page.evaluate(() => localStorage.getItem('carrel.largeText')), '1', 'large text was not remembered');
    await page.keyboard.press('Space');
    await page.waitForFunction(() => document.getElementById('large-text').getAttribute('aria-pressed') === 'false');
    assert.ok(!(await page.evaluate(() => document.documentElement.classList.contains('large-text'))),
      'large text was turned off but <html> still has the "large-text" class');

    await page.locator('#lang-toggle').focus();
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.documentElement.lang === 'es');
    assert.equal(await page.locator('label[for="prompt"]').textContent(), 'Su pregunta', 'the question label is not in Spanish');
    assert.equal((await page.locator('#end-session').textContent()).trim(), 'Terminar sesión', 'the End session button is not in Spanish');
    assert.match(await page.locator('#meter-text').textContent(), /Quedan/, 'the meter text is not in Spanish');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.documentElement.lang === 'en');
    assert.equal(await page.locator('label[for="prompt"]').textContent(), 'Your question', 'the question label is not back in English');

    // 6. Idle: fast-forward past the idle timeout; the page signs out and wipes the conversation.
    step(`6 idle sign-out after ${idleSeconds}s`);
    const deleteRequest = page.waitForRequest(
      (r) => r.method() === 'DELETE' && new URL(r.url()).pathname === '/v1/patron/sessions/current',
    );
    await page.clock.fastForward(idleSeconds * 1000 + 1000);
    await page.locator('#signin-form').waitFor({ state: 'visible' });
    await deleteRequest.catch(() => assert.fail('no DELETE /v1/patron/sessions/current was sent on idle sign-out'));
    assert.ok(await page.locator('#chat-view').isHidden(), 'the chat is still shown after the idle sign-out');
    assert.equal(await page.locator('#transcript .msg').count(), 0, '#transcript still has messages after the idle sign-out');
    const pageText = await page.evaluate(() => document.documentElement.textContent);
    assert.ok(!pageText.includes(QUESTION), 'the question is still in the page after the idle sign-out');
    assert.ok(!pageText.includes(answer), 'the answer is still in the page after the idle sign-out');
    assert.ok(!pageText.includes(answer.slice(0, 24)), 'part of the answer is still in the page after the idle sign-out');
    await page.waitForFunction(() => /signed out/i.test(document.getElementById('status').textContent)).catch(async () => {
      assert.fail(`the live region does not announce the sign-out: "${await page.locator('#status').textContent()}"`);
    });
    assert.equal(await page.evaluate(() => document.activeElement.id), 'signin-heading', 'focus did not move to the sign-in heading');
    assert.equal(await page.locator('body').getAttribute('data-idle-timeout'), null, 'body[data-idle-timeout] is still set after sign-out');

    // 7. No card number or PIN anywhere the next patron could find it.
    step('7 no card number or PIN left behind');
    const leftovers = await page.evaluate(() => {
      const dump = (s) => Array.from({ length: s.length }, (_, i) => [s.key(i), s.getItem(s.key(i))]);
      return {
        local: dump(localStorage),
        session: dump(sessionStorage),
        html: document.documentElement.outerHTML,
        values: Array.from(document.querySelectorAll('input, textarea, select')).map((e) => e.value),
        url: location.href,
      };
    });
    for (const [where, entries] of [['localStorage', leftovers.local], ['sessionStorage', leftovers.session]]) {
      for (const [k, v] of entries) {
        if (where === 'localStorage' && k === 'carrel.kioskKey') continue; // checked to equal KIOSK_KEY above
        assert.ok(!`${k}=${v}`.includes(CARD), `${where}["${k}"] holds the card number`);
        assert.ok(!`${k}=${v}`.includes(PIN), `${where}["${k}"] holds the PIN`);
      }
    }
    assert.ok(!leftovers.html.includes(CARD), 'the card number is in the DOM after sign-out');
    assert.ok(!leftovers.html.includes(PIN), 'the PIN is in the DOM after sign-out');
    for (const value of leftovers.values) {
      assert.ok(!value.includes(CARD) && !value.includes(PIN), 'a form field still holds the card number or PIN after sign-out');
    }
    assert.ok(!leftovers.url.includes(CARD) && !leftovers.url.includes(PIN), 'the URL holds the card number or PIN');

    assertNoProblems();
  } catch (e) {
    if (page) {
      const shot = path.join(os.tmpdir(), 'kiosk-failure.png');
      await page.screenshot({ path: shot, fullPage: true }).then(() => console.error(`kiosk: screenshot: ${shot}`), () => {});
    }
    throw e;
  } finally {
    await browser.close();
  }
}

main().then(
  () => {
    console.log('kiosk: ok');
    process.exit(0);
  },
  (e) => {
    console.error(`kiosk: FAIL in step "${currentStep}": ${e && e.message ? e.message : e}`);
    process.exit(1);
  },
);
