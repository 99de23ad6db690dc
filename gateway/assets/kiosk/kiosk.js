// Carrel kiosk: a patron signs in with a library card and PIN (or a guest code), chats with a
// model, and is signed out (transcript wiped) on "End session" or after being idle.
// Plain ES2020, no dependencies; served under a CSP that forbids inline script and style.
'use strict';

(() => {
  const KEY_STORAGE = 'carrel.kioskKey';
  const LARGE_STORAGE = 'carrel.largeText';
  const MIN_IDLE_SECONDS = 30;
  const WARN_BEFORE_SECONDS = 60;
  const TICK_MS = 1000;
  const SIGNIN_FIELDS_IDLE_MS = 120 * 1000; // half-typed card numbers do not wait for the next patron

  // ---------------------------------------------------------------------------------------------
  // Every string the page shows. `{name}` is replaced by a parameter.
  const STRINGS = {
    en: {
      pageTitle: 'Library AI helper',
      appTitle: 'Library AI helper',
      langToggle: 'Español',
      largeText: 'Large text',
      notice: 'Answers come from an AI model and can be wrong. Check important facts with library staff or another source. The library does not keep your card number, your PIN or your conversation. Only how much you used today is counted, under a code that does not identify you.',
      idleWarning: 'Are you still there? You will be signed out in about a minute and this conversation will be cleared.',
      stay: 'Stay signed in',
      setupHeading: 'Set up this kiosk',
      setupHelp: 'For library staff: paste the kiosk key from the Carrel admin. It is kept on this computer only and is used only to sign patrons in.',
      kioskKey: 'Kiosk key',
      save: 'Save',
      cancel: 'Cancel',
      setupEmpty: 'Enter the kiosk key.',
      setupSaved: 'Kiosk key saved. Patrons can sign in now.',
      setupNeeded: 'This computer is not set up for the AI helper. Please ask library staff.',
      signinHeading: 'Sign in',
      card: 'Library card number',
      pin: 'PIN',
      signin: 'Sign in',
      guestHeading: 'No library card?',
      guestCode: 'Guest code (from the desk)',
      guestSignin: 'Use guest code',
      signingIn: 'Signing in…',
      needCardPin: 'Enter your library card number and PIN.',
      needGuestCode: 'Enter your guest code.',
      signedIn: 'You are signed in. Type your question.',
      chatHeading: 'Ask a question',
      endSession: 'End session',
      leftToday: 'Left today',
      meterText: '{left} of {limit} tokens left today',
      noLimit: 'No daily limit',
      model: 'Model',
      conversation: 'Conversation',
      prompt: 'Your question',
      promptHint: 'Press Enter to send. Shift+Enter starts a new line.',
      send: 'Send',
      you: 'You',
      ai: 'AI answer',
      thinking: 'Waiting for the answer…',
      answerDone: 'The answer is complete.',
      answerStopped: 'The answer stopped before it was finished.',
      answerMaybeIncomplete: 'The answer may be incomplete.',
      emptyPrompt: 'Type a question first.',
      signedOutIdle: 'You were signed out because there was no activity. Your conversation was cleared from this screen.',
      signedOutManual: 'You are signed out. Your conversation was cleared from this screen.',
      signedOutExpired: 'Your session has ended. Your conversation was cleared from this screen. Please sign in again.',
      // Error codes from the server.
      err_invalid_credentials: 'The card number or PIN is not right. Please try again.',
      err_patron_blocked: 'This card cannot use the AI helper right now. Please see library staff.',
      err_card_locked: 'This card is locked after too many wrong PINs. Please try again later or see library staff.',
      err_sign_in_throttled: 'Too many sign-in attempts. Please wait a few minutes and try again.',
      err_invalid_guest_code: 'That guest code is not right. Please check it and try again.',
      err_guest_pass_exhausted: 'This guest pass has been used up. Please ask at the desk for a new one.',
      err_guest_pass_expired: 'This guest pass has expired. Please ask at the desk for a new one.',
      err_ils_unavailable: 'The library system cannot be reached right now. Please try again in a few minutes or see library staff.',
      err_invalid_api_key: 'This computer is not set up for the AI helper. Please ask library staff.',
      err_insufficient_quota: 'You have used all of today\'s allowance.',
      err_insufficient_quota_renews: 'You have used all of today\'s allowance. It renews {when}.',
      err_network: 'The library\'s server could not be reached. Please try again.',
      err_generic: 'Something went wrong (code: {code}). Please try again or ask library staff.',
    },
    es: {
      pageTitle: 'Asistente de IA de la biblioteca',
      appTitle: 'Asistente de IA de la biblioteca',
      langToggle: 'English',
      largeText: 'Letra grande',
      notice: 'Las respuestas vienen de un modelo de inteligencia artificial (IA) y pueden estar equivocadas. Confirme los datos importantes con el personal de la biblioteca o con otra fuente. La biblioteca no guarda su número de tarjeta, su PIN ni su conversación. Solo se cuenta cuánto usó hoy, con un código que no lo identifica.',
      idleWarning: '¿Sigue ahí? Su sesión se cerrará en un minuto más o menos y esta conversación se borrará.',
      stay: 'Seguir conectado',
      setupHeading: 'Configurar esta computadora',
      setupHelp: 'Para el personal de la biblioteca: pegue la clave del quiosco que da la administración de Carrel. Se guarda solo en esta computadora y solo se usa para que los usuarios inicien sesión.',
      kioskKey: 'Clave del quiosco',
      save: 'Guardar',
      cancel: 'Cancelar',
      setupEmpty: 'Escriba la clave del quiosco.',
      setupSaved: 'Clave guardada. Ya se puede iniciar sesión.',
      setupNeeded: 'Esta computadora no está configurada para el asistente de IA. Pida ayuda al personal de la biblioteca.',
      signinHeading: 'Iniciar sesión',
      card: 'Número de tarjeta de la biblioteca',
      pin: 'PIN',
      signin: 'Iniciar sesión',
      guestHeading: '¿No tiene tarjeta de la biblioteca?',
      guestCode: 'Código de invitado (del mostrador)',
      guestSignin: 'Usar código de invitado',
      signingIn: 'Iniciando sesión…',
      needCardPin: 'Escriba su número de tarjeta y su PIN.',
      needGuestCode: 'Escriba su código de invitado.',
      signedIn: 'Ha iniciado sesión. Escriba su pregunta.',
      chatHeading: 'Haga una pregunta',
      endSession: 'Terminar sesión',
      leftToday: 'Le queda hoy',
      meterText: 'Quedan {left} de {limit} tokens por hoy',
      noLimit: 'Sin límite diario',
      model: 'Modelo',
      conversation: 'Conversación',
      prompt: 'Su pregunta',
      promptHint: 'Pulse Intro para enviar. Mayús+Intro empieza una línea nueva.',
      send: 'Enviar',
      you: 'Usted',
      ai: 'Respuesta de la IA',
      thinking: 'Esperando la respuesta…',
      answerDone: 'La respuesta está completa.',
      answerStopped: 'La respuesta se detuvo antes de terminar.',
      answerMaybeIncomplete: 'Puede que la respuesta esté incompleta.',
      emptyPrompt: 'Primero escriba una pregunta.',
      signedOutIdle: 'Se cerró su sesión porque no hubo actividad. Su conversación se borró de esta pantalla.',
      signedOutManual: 'Cerró su sesión. Su conversación se borró de esta pantalla.',
      signedOutExpired: 'Su sesión terminó. Su conversación se borró de esta pantalla. Inicie sesión otra vez.',
      err_invalid_credentials: 'El número de tarjeta o el PIN no es correcto. Inténtelo otra vez.',
      err_patron_blocked: 'Esta tarjeta no puede usar el asistente de IA por ahora. Hable con el personal de la biblioteca.',
      err_card_locked: 'Esta tarjeta está bloqueada por demasiados PIN incorrectos. Inténtelo más tarde o hable con el personal de la biblioteca.',
      err_sign_in_throttled: 'Demasiados intentos de inicio de sesión. Espere unos minutos e inténtelo otra vez.',
      err_invalid_guest_code: 'Ese código de invitado no es correcto. Revíselo e inténtelo otra vez.',
      err_guest_pass_exhausted: 'Este pase de invitado ya se agotó. Pida uno nuevo en el mostrador.',
      err_guest_pass_expired: 'Este pase de invitado venció. Pida uno nuevo en el mostrador.',
      err_ils_unavailable: 'No se puede conectar con el sistema de la biblioteca en este momento. Inténtelo en unos minutos o hable con el personal.',
      err_invalid_api_key: 'Esta computadora no está configurada para el asistente de IA. Pida ayuda al personal de la biblioteca.',
      err_insufficient_quota: 'Ya usó todo lo disponible para hoy.',
      err_insufficient_quota_renews: 'Ya usó todo lo disponible para hoy. Se renueva el {when}.',
      err_network: 'No se pudo conectar con el servidor de la biblioteca. Inténtelo otra vez.',
      err_generic: 'Algo salió mal (código: {code}). Inténtelo otra vez o pida ayuda al personal de la biblioteca.',
    },
  };

  // ---------------------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const el = {
    html: document.documentElement,
    body: document.body,
    title: document.querySelector('title'),
    langToggle: $('lang-toggle'),
    largeText: $('large-text'),
    status: $('status'),
    idleWarning: $('idle-warning'),
    stay: $('stay'),
    setupView: $('setup-view'),
    setupHeading: $('setup-heading'),
    setupForm: $('setup-form'),
    setupError: $('setup-error'),
    setupCancel: $('setup-cancel'),
    kioskKey: $('kiosk-key'),
    signinView: $('signin-view'),
    signinHeading: $('signin-heading'),
    signinForm: $('signin-form'),
    signinError: $('signin-error'),
    signinButton: $('signin-button'),
    card: $('card'),
    pin: $('pin'),
    guestForm: $('guest-form'),
    guestCode: $('guest-code'),
    guestButton: $('guest-button'),
    chatView: $('chat-view'),
    endSession: $('end-session'),
    meter: $('meter'),
    meterText: $('meter-text'),
    modelRow: $('model-row'),
    model: $('model'),
    transcript: $('transcript'),
    answerLive: $('answer-live'),
    chatError: $('chat-error'),
    chatForm: $('chat-form'),
    prompt: $('prompt'),
    send: $('send'),
  };

  // ---------------------------------------------------------------------------------------------
  // State. Everything about a patron lives in `session` and is dropped on sign-out.
  let lang = (navigator.language || 'en').toLowerCase().startsWith('es') ? 'es' : 'en';
  let session = null; // { token, idleMs, expiresAtLocal, quota, messages, models, abort }
  let lastActivity = Date.now();
  let ticker = null;
  // Messages that must be re-translated when the language changes: [element, key, params].
  let statusMsg = null;
  let signinErr = null;
  let setupErr = null;
  let chatErr = null;

  function t(key, params) {
    const table = STRINGS[lang] || STRINGS.en;
    let s = key in table ? table[key] : (STRINGS.en[key] !== undefined ? STRINGS.en[key] : key);
    if (params) {
      s = s.replace(/\{(\w+)\}/g, (m, name) => (params[name] !== undefined ? String(params[name]) : m));
    }
    return s;
  }

  function fmtNumber(n) {
    return new Intl.NumberFormat(lang === 'es' ? 'es-ES' : 'en-US').format(n);
  }

  function fmtWhen(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    return new Intl.DateTimeFormat(lang === 'es' ? 'es-ES' : 'en-US', {
      weekday: 'long', hour: 'numeric', minute: '2-digit',
    }).format(d);
  }

  // ---------------------------------------------------------------------------------------------
  // Language and large text.
  function applyLanguage() {
    el.html.lang = lang;
    for (const node of document.querySelectorAll('[data-i18n]')) {
      node.textContent = t(node.dataset.i18n);
    }
    el.langToggle.textContent = t('langToggle');
    el.langToggle.lang = lang === 'es' ? 'en' : 'es';
    renderMessage(el.status, statusMsg);
    renderMessage(el.signinError, signinErr, true);
    renderMessage(el.setupError, setupErr, true);
    renderMessage(el.chatError, chatErr, true);
    if (session) renderQuota();
  }

  function renderMessage(node, msg, hideWhenEmpty) {
    let text = '';
    if (msg) {
      // Dates are formatted at render time, so they follow the language too.
      text = msg.whenIso ? t(msg.key, { ...msg.params, when: fmtWhen(msg.whenIso) }) : t(msg.key, msg.params);
    }
    node.textContent = text;
    if (hideWhenEmpty) node.hidden = !text;
  }

  function setLargeText(on) {
    el.html.classList.toggle('large-text', on);
    el.largeText.setAttribute('aria-pressed', on ? 'true' : 'false');
    try { localStorage.setItem(LARGE_STORAGE, on ? '1' : '0'); } catch (_) { /* storage off */ }
  }

  // ---------------------------------------------------------------------------------------------
  // Messages.
  function announce(key, params) {
    statusMsg = key ? { key, params } : null;
    // Clear first so that the same sentence twice is announced twice.
    el.status.textContent = '';
    if (statusMsg) {
      setTimeout(() => { if (statusMsg && statusMsg.key === key) renderMessage(el.status, statusMsg); }, 50);
    }
  }

  function errorMessage(code, extra) {
    if (code && STRINGS.en['err_' + code] !== undefined) return { key: 'err_' + code, ...(extra || {}) };
    return { key: 'err_generic', params: { code: code || 'unknown' } };
  }

  function showSigninError(msg) {
    signinErr = msg;
    renderMessage(el.signinError, signinErr, true);
  }

  function showChatError(msg) {
    chatErr = msg;
    renderMessage(el.chatError, chatErr, true);
    if (msg) {
      // #chat-error is itself an alert; keep the status line from saying it twice.
      statusMsg = null;
      el.status.textContent = '';
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Views.
  function show(view) {
    el.setupView.hidden = view !== 'setup';
    el.signinView.hidden = view !== 'signin';
    el.chatView.hidden = view !== 'chat';
  }

  function kioskKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ''; } catch (_) { return ''; }
  }

  function showSetup(errMsg) {
    setupErr = errMsg || null;
    renderMessage(el.setupError, setupErr, true);
    el.setupCancel.hidden = !kioskKey();
    show('setup');
    el.setupHeading.focus();
  }

  function showSignin(focusHeading) {
    clearSigninFields();
    show('signin');
    if (focusHeading !== false) el.signinHeading.focus();
  }

  function clearSigninFields() {
    el.card.value = '';
    el.pin.value = '';
    el.guestCode.value = '';
    for (const input of [el.card, el.pin, el.guestCode]) input.removeAttribute('aria-invalid');
  }

  // Picks up `#key=...` from the address (staff set-up), stores it and removes it from the URL.
  function takeKeyFromFragment() {
    if (!location.hash || location.hash.length < 2) return false;
    const params = new URLSearchParams(location.hash.slice(1));
    const key = params.get('key');
    history.replaceState(history.state, '', location.pathname + location.search);
    if (!key) return false;
    try { localStorage.setItem(KEY_STORAGE, key.trim()); } catch (_) { return false; }
    return true;
  }

  // ---------------------------------------------------------------------------------------------
  // HTTP.
  async function readError(res) {
    let code = null;
    let message = null;
    try {
      const body = await res.json();
      if (body && body.error) {
        code = body.error.code || body.error.type || null;
        message = body.error.message || null;
      }
    } catch (_) { /* not JSON */ }
    return { status: res.status, code: code || 'http_' + res.status, message };
  }

  function authHeaders(token, json) {
    const h = { Authorization: 'Bearer ' + token, Accept: 'application/json' };
    if (json) h['Content-Type'] = 'application/json';
    return h;
  }

  // ---------------------------------------------------------------------------------------------
  // Sign-in.
  let signingIn = false;

  async function signIn(body, which) {
    if (signingIn) return;
    const key = kioskKey();
    if (!key) { showSetup({ key: 'setupNeeded' }); return; }
    signingIn = true;
    el.signinButton.disabled = true;
    el.guestButton.disabled = true;
    showSigninError(null);
    announce('signingIn');
    let res;
    try {
      res = await fetch('/v1/patron/sessions', {
        method: 'POST',
        headers: authHeaders(key, true),
        body: JSON.stringify(body),
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (_) {
      res = null;
    } finally {
      // The request body held the card and PIN; drop our reference at once.
      body = null;
      signingIn = false;
      el.signinButton.disabled = false;
      el.guestButton.disabled = false;
    }
    if (!res) {
      announce(null);
      el.pin.value = '';
      showSigninError(errorMessage('network'));
      return;
    }
    if (res.status !== 201 && res.status !== 200) {
      const err = await readError(res);
      announce(null);
      el.pin.value = '';
      if (err.code === 'invalid_api_key') {
        clearSigninFields();
        showSetup({ key: 'err_invalid_api_key' });
        return;
      }
      showSigninError(errorMessage(err.code));
      if (which === 'guest') {
        el.guestCode.setAttribute('aria-invalid', 'true');
        el.guestCode.focus();
        el.guestCode.select();
      } else if (err.code === 'invalid_credentials') {
        el.card.setAttribute('aria-invalid', 'true');
        el.pin.setAttribute('aria-invalid', 'true');
        el.pin.focus();
      } else {
        el.card.focus();
      }
      return;
    }
    let data;
    try { data = await res.json(); } catch (_) { data = null; }
    clearSigninFields();
    if (!data || typeof data.token !== 'string') {
      announce(null);
      showSigninError(errorMessage('bad_response'));
      return;
    }
    await startSession(data, res.headers.get('Date'));
  }

  function localExpiry(expiresAt, serverDate) {
    const exp = Date.parse(expiresAt);
    if (Number.isNaN(exp)) return null;
    const server = serverDate ? Date.parse(serverDate) : NaN;
    // Correct for a kiosk clock that differs from the server's.
    return Number.isNaN(server) ? exp : exp - server + Date.now();
  }

  async function startSession(data, serverDate) {
    const idleSeconds = Math.max(MIN_IDLE_SECONDS, Number(data.idle_timeout_seconds) || MIN_IDLE_SECONDS);
    session = {
      token: data.token,
      idleMs: idleSeconds * 1000,
      expiresAtLocal: localExpiry(data.expires_at, serverDate),
      quota: data.quota || null,
      messages: [],
      models: [],
      abort: null,
      warned: false,
    };
    el.body.dataset.idleTimeout = String(idleSeconds);
    showSigninError(null);
    chatErr = null;
    renderMessage(el.chatError, null, true);
    el.transcript.replaceChildren();
    el.answerLive.replaceChildren();
    el.transcript.dataset.state = 'idle';
    el.prompt.value = '';
    el.send.disabled = false;
    renderQuota();
    show('chat');
    markActivity();
    startTicker();
    el.prompt.focus();
    announce('signedIn');
    loadModels(session);
  }

  async function loadModels(s) {
    let ids = [];
    try {
      const res = await fetch('/v1/models', { headers: authHeaders(s.token), cache: 'no-store', credentials: 'omit' });
      if (res.ok) {
        const body = await res.json();
        ids = (body && Array.isArray(body.data) ? body.data : [])
          .map((m) => (m && typeof m.id === 'string' ? m.id : null))
          .filter(Boolean);
      } else if (res.status === 401) {
        if (session === s) signOut('expired');
        return;
      }
    } catch (_) { /* keep going; the chat call will report problems */ }
    if (session !== s) return;
    s.models = ids;
    el.model.replaceChildren(...ids.map((id) => {
      const opt = document.createElement('option');
      opt.value = id;
      opt.textContent = id;
      return opt;
    }));
    el.modelRow.hidden = ids.length < 2;
  }

  // ---------------------------------------------------------------------------------------------
  // Quota meter.
  function renderQuota() {
    const q = session && session.quota;
    if (!q) {
      el.meter.hidden = true;
      el.meterText.textContent = '';
      return;
    }
    if (q.limit === null || q.limit === undefined || q.remaining === null || q.remaining === undefined) {
      el.meter.hidden = true;
      el.meterText.textContent = t('noLimit');
      return;
    }
    const limit = Math.max(0, Number(q.limit) || 0);
    const left = Math.min(limit, Math.max(0, Number(q.remaining) || 0));
    el.meter.hidden = false;
    el.meter.max = Math.max(1, limit);
    el.meter.low = Math.max(0, Math.round(limit * 0.1));
    el.meter.high = Math.round(limit * 0.5);
    el.meter.optimum = limit;
    el.meter.value = left;
    el.meterText.textContent = t('meterText', { left: fmtNumber(left), limit: fmtNumber(limit) });
  }

  async function refreshSession(s) {
    try {
      const res = await fetch('/v1/patron/sessions/current', { headers: authHeaders(s.token), cache: 'no-store', credentials: 'omit' });
      if (session !== s) return;
      if (res.status === 401) { signOut('expired'); return; }
      if (!res.ok) return;
      const data = await res.json();
      if (session !== s) return;
      if (data.quota) s.quota = data.quota;
      if (data.expires_at) {
        const exp = localExpiry(data.expires_at, res.headers.get('Date'));
        if (exp !== null) s.expiresAtLocal = exp;
      }
      renderQuota();
    } catch (_) { /* the meter stays as it was */ }
  }

  // After an answer: the server may count the tokens a moment after the stream ends, so look
  // again a few times (briefly) until the count moves.
  function refreshQuotaAfterAnswer(s, usedBefore) {
    const delays = [0, 500, 1500, 3000];
    const attempt = async (i) => {
      if (session !== s) return;
      await refreshSession(s);
      if (session !== s) return;
      const usedNow = s.quota ? s.quota.used : null;
      if (usedNow !== usedBefore || i + 1 >= delays.length) return;
      setTimeout(() => attempt(i + 1), delays[i + 1]);
    };
    return attempt(0);
  }

  // ---------------------------------------------------------------------------------------------
  // Chat.
  function addMessage(role, text) {
    const wrap = document.createElement('div');
    wrap.className = 'msg ' + role;
    const who = document.createElement('p');
    who.className = 'who';
    who.dataset.i18n = role === 'user' ? 'you' : 'ai';
    who.textContent = t(who.dataset.i18n);
    const body = document.createElement('p');
    body.className = 'text';
    const node = document.createTextNode(text);
    body.appendChild(node);
    wrap.append(who, body);
    el.transcript.appendChild(wrap);
    return { wrap, node };
  }

  function addNote(wrap, key) {
    const note = document.createElement('p');
    note.className = 'note';
    note.dataset.i18n = key;
    note.textContent = t(key);
    wrap.appendChild(note);
  }

  function scrollToEnd() {
    el.transcript.scrollTop = el.transcript.scrollHeight;
  }

  // Hands finished sentences of the streamed answer to the screen-reader live region.
  function makeSpeaker() {
    let pending = '';
    const say = (text) => {
      const s = text.trim();
      if (!s) return;
      const p = document.createElement('p');
      p.textContent = s;
      el.answerLive.appendChild(p);
    };
    return {
      push(text) {
        pending += text;
        const re = /[.!?…]["')\]]?\s+|\n+/g;
        let cut = -1;
        let m;
        while ((m = re.exec(pending)) !== null) cut = m.index + m[0].length;
        if (cut > 0) { say(pending.slice(0, cut)); pending = pending.slice(cut); }
      },
      flush() { say(pending); pending = ''; },
    };
  }

  async function sendPrompt() {
    const s = session;
    if (!s || s.abort) return;
    const text = el.prompt.value.trim();
    if (!text) { announce('emptyPrompt'); el.prompt.focus(); return; }
    showChatError(null);
    el.prompt.value = '';
    s.messages.push({ role: 'user', content: text });
    const userMsg = addMessage('user', text);
    const answer = addMessage('assistant', '');
    answer.wrap.dataset.state = 'streaming';
    el.transcript.dataset.state = 'streaming';
    el.answerLive.replaceChildren();
    el.send.disabled = true;
    scrollToEnd();
    announce('thinking');

    const controller = new AbortController();
    s.abort = controller;
    const usedBefore = s.quota ? s.quota.used : null;
    const speaker = makeSpeaker();
    let received = '';
    let outcome = 'done'; // done | incomplete | error | expired | aborted
    let failure = null;

    const append = (piece) => {
      if (!piece) return;
      if (!received) announce(null);
      received += piece;
      answer.node.appendData(piece);
      speaker.push(piece);
      scrollToEnd();
    };

    try {
      const res = await fetch('/v1/chat/completions', {
        method: 'POST',
        headers: { ...authHeaders(s.token, true), Accept: 'text/event-stream' },
        body: JSON.stringify({ model: el.model.value || s.models[0] || undefined, messages: s.messages, stream: true }),
        cache: 'no-store',
        credentials: 'omit',
        signal: controller.signal,
      });
      if (!res.ok) {
        failure = await readError(res);
        outcome = (res.status === 401) ? 'expired' : 'error';
      } else if (!(res.headers.get('Content-Type') || '').includes('text/event-stream')) {
        const body = await res.json();
        append(body && body.choices && body.choices[0] && body.choices[0].message
          ? String(body.choices[0].message.content || '') : '');
      } else {
        const result = await readStream(res, append);
        if (result.error) { outcome = 'error'; failure = result.error; }
        else if (!result.done) outcome = 'incomplete';
      }
    } catch (e) {
      if (controller.signal.aborted || session !== s) outcome = 'aborted';
      else { outcome = 'error'; failure = { code: 'network' }; }
    }

    if (session !== s || outcome === 'aborted') return; // signed out meanwhile: nothing to keep
    s.abort = null;
    speaker.flush();

    if (outcome === 'expired') { signOut('expired'); return; }

    if (outcome === 'error' && !received) {
      // Nothing came back: take the question out again so it can be retried.
      s.messages.pop();
      userMsg.wrap.remove();
      answer.wrap.remove();
      el.prompt.value = text;
    } else {
      s.messages.push({ role: 'assistant', content: received });
      if (outcome === 'error') addNote(answer.wrap, 'answerStopped');
      if (outcome === 'incomplete') addNote(answer.wrap, 'answerMaybeIncomplete');
      answer.wrap.dataset.state = 'done';
    }
    el.transcript.dataset.state = 'done';
    el.send.disabled = false;

    if (outcome === 'error') {
      const code = failure && failure.code;
      if (code === 'insufficient_quota') {
        await refreshSession(s);
        if (session !== s) return;
        const resets = s.quota && s.quota.resets_at;
        showChatError(resets
          ? { key: 'err_insufficient_quota_renews', whenIso: resets }
          : { key: 'err_insufficient_quota' });
      } else {
        showChatError(errorMessage(code));
        refreshSession(s);
      }
    } else {
      announce('answerDone');
      await refreshQuotaAfterAnswer(s, usedBefore);
    }
    if (session === s && document.activeElement === document.body) el.prompt.focus();
  }

  // Reads an OpenAI-style server-sent event stream; calls `append` with each piece of text.
  async function readStream(res, append) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let done = false;
    let error = null;

    const handleEvent = (raw) => {
      const data = raw.split('\n')
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, ''))
        .join('\n');
      if (!data) return;
      if (data.trim() === '[DONE]') { done = true; return; }
      let chunk;
      try { chunk = JSON.parse(data); } catch (_) { return; }
      if (chunk && chunk.error) {
        error = { code: chunk.error.code || chunk.error.type || 'stream_error', message: chunk.error.message };
        return;
      }
      const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : null;
      const piece = choice && choice.delta ? choice.delta.content : null;
      if (typeof piece === 'string') append(piece);
    };

    const drain = (final) => {
      buffer = buffer.replace(/\r\n?/g, '\n');
      let idx;
      while (!done && !error && (idx = buffer.indexOf('\n\n')) !== -1) {
        const raw = buffer.slice(0, idx);
        buffer = buffer.slice(idx + 2);
        handleEvent(raw);
      }
      if (final && buffer.trim() && !done && !error) { handleEvent(buffer); buffer = ''; }
    };

    for (;;) {
      const { value, done: eof } = await reader.read();
      if (eof) { buffer += decoder.decode(); drain(true); break; }
      buffer += decoder.decode(value, { stream: true });
      drain(false);
      if (done || error) { try { await reader.cancel(); } catch (_) { /* ignore */ } break; }
    }
    return { done, error };
  }

  // ---------------------------------------------------------------------------------------------
  // Sign-out: wipes everything the patron left on the page.
  function wipe() {
    const s = session;
    session = null;
    if (s) {
      if (s.abort) { try { s.abort.abort(); } catch (_) { /* ignore */ } }
      s.messages.length = 0;
      s.token = null;
      s.quota = null;
    }
    el.transcript.replaceChildren();
    el.answerLive.replaceChildren();
    el.transcript.dataset.state = 'idle';
    el.prompt.value = '';
    el.model.replaceChildren();
    el.modelRow.hidden = true;
    el.meter.value = 0;
    el.meter.max = 1;
    for (const a of ['low', 'high', 'optimum']) el.meter.removeAttribute(a);
    el.meterText.textContent = '';
    el.idleWarning.hidden = true;
    el.send.disabled = false;
    chatErr = null;
    renderMessage(el.chatError, null, true);
    delete el.body.dataset.idleTimeout;
    clearSigninFields();
    return s;
  }

  function deleteSession(token) {
    if (!token) return;
    try {
      fetch('/v1/patron/sessions/current', {
        method: 'DELETE',
        headers: authHeaders(token),
        keepalive: true,
        cache: 'no-store',
        credentials: 'omit',
      }).catch(() => { /* ignore */ });
    } catch (_) { /* ignore */ }
  }

  function signOut(reason) {
    if (!session) return;
    const token = session.token;
    wipe();
    if (reason !== 'expired') deleteSession(token);
    showSignin(true);
    announce(reason === 'idle' ? 'signedOutIdle' : reason === 'expired' ? 'signedOutExpired' : 'signedOutManual');
  }

  // ---------------------------------------------------------------------------------------------
  // Idle timer: Date.now() checked once a second, so a sleeping computer or a fast-forwarded
  // clock signs out as soon as it wakes.
  function markActivity() {
    lastActivity = Date.now();
    if (session && session.warned) {
      session.warned = false;
      el.idleWarning.hidden = true;
    }
  }

  function tick() {
    const s = session;
    const now = Date.now();
    if (!s) {
      if (now - lastActivity >= SIGNIN_FIELDS_IDLE_MS && (el.card.value || el.pin.value || el.guestCode.value || signinErr)) {
        clearSigninFields();
        showSigninError(null);
      }
      return;
    }
    if (s.expiresAtLocal !== null && now >= s.expiresAtLocal) { signOut('expired'); return; }
    const idle = now - lastActivity;
    if (idle >= s.idleMs) { signOut('idle'); return; }
    if (s.idleMs > 90 * 1000 && idle >= s.idleMs - WARN_BEFORE_SECONDS * 1000 && !s.warned) {
      s.warned = true;
      el.idleWarning.hidden = false;
    }
  }

  function startTicker() {
    if (ticker === null) ticker = setInterval(tick, TICK_MS);
  }

  // ---------------------------------------------------------------------------------------------
  // Wiring.
  function init() {
    let large = false;
    try { large = localStorage.getItem(LARGE_STORAGE) === '1'; } catch (_) { /* storage off */ }
    setLargeText(large);
    applyLanguage();

    takeKeyFromFragment();
    window.addEventListener('hashchange', () => {
      if (takeKeyFromFragment() && !session) { announce('setupSaved'); showSignin(true); }
    });

    for (const type of ['keydown', 'pointerdown', 'input']) {
      document.addEventListener(type, markActivity, { capture: true, passive: true });
    }

    el.langToggle.addEventListener('click', () => {
      lang = lang === 'es' ? 'en' : 'es';
      applyLanguage();
    });
    el.largeText.addEventListener('click', () => {
      setLargeText(el.largeText.getAttribute('aria-pressed') !== 'true');
    });
    el.stay.addEventListener('click', () => { markActivity(); if (session) el.prompt.focus(); });

    el.setupForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const key = el.kioskKey.value.trim();
      if (!key) {
        setupErr = { key: 'setupEmpty' };
        renderMessage(el.setupError, setupErr, true);
        el.kioskKey.focus();
        return;
      }
      try { localStorage.setItem(KEY_STORAGE, key); } catch (_) { /* storage off */ }
      el.kioskKey.value = '';
      setupErr = null;
      renderMessage(el.setupError, null, true);
      showSignin(true);
      announce('setupSaved');
    });
    el.setupCancel.addEventListener('click', () => {
      el.kioskKey.value = '';
      setupErr = null;
      renderMessage(el.setupError, null, true);
      showSignin(true);
    });

    el.signinForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const card = el.card.value.trim();
      const pin = el.pin.value;
      if (!card || !pin) {
        showSigninError({ key: 'needCardPin' });
        (card ? el.pin : el.card).focus();
        return;
      }
      signIn({ card, pin }, 'card');
    });
    el.guestForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const code = el.guestCode.value.trim();
      if (!code) {
        showSigninError({ key: 'needGuestCode' });
        el.guestCode.focus();
        return;
      }
      signIn({ guest_code: code }, 'guest');
    });

    el.chatForm.addEventListener('submit', (ev) => { ev.preventDefault(); sendPrompt(); });
    el.prompt.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        if (!el.send.disabled) sendPrompt();
      }
    });
    el.endSession.addEventListener('click', () => signOut('manual'));

    // Leaving or reloading the page ends the session too; nothing survives in the page.
    window.addEventListener('pagehide', () => {
      if (!session) return;
      const token = session.token;
      wipe();
      deleteSession(token);
      show('signin');
    });

    startTicker();
    if (kioskKey()) showSignin(true);
    else showSetup();
  }

  init();
})();
