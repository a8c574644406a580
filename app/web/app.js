// chatstream web client: plain JavaScript modules, no build step (./js/). It talks to the
// REST API with the session cookie and follows everything live over one WebSocket per tab.
// This module signs in and out and starts the page; the rest is in ./js/ by concern.
import { ApiError, api } from "./js/api.js";
import { endLive, live, selectConversation } from "./js/chat.js";
import { loadAgents, loadConversations, resetConversationActions } from "./js/conversations.js";
import { clearError, el, session, showConversations, showError, state } from "./js/page.js";

// -- signing in and out ---------------------------------------------------------------

function showLogin() {
  live.stop();
  endLive();
  el.loading.hidden = true;
  el.app.hidden = true;
  el.logout.hidden = true;
  el.whoami.hidden = true;
  el.toggleConversations.hidden = true;
  el.login.hidden = false;
  el.loginKey.focus();
}

async function showApp(me) {
  state.me = me;
  el.loading.hidden = true;
  el.login.hidden = true;
  el.app.hidden = false;
  el.logout.hidden = false;
  el.whoami.hidden = false;
  el.whoami.textContent = `${me.key.name} · ${me.company.name} (${me.role})`;
  el.toggleConversations.hidden = false;
  showConversations(true); // a phone starts on the list (the chat once a conversation is open)
  live.start();
  live.watchConversations(); // first, so that no conversation made meanwhile is missed
  state.agentsLoaded = loadAgents();
  await Promise.all([state.agentsLoaded, loadConversations(true)]);
  // After a reload: back to the conversation this tab had open.
  const saved = sessionStorage.getItem("chatstream.current");
  const conversation = saved && state.conversations.find((c) => c.id === saved);
  if (conversation && !state.current) await selectConversation(conversation);
}

async function signIn(key) {
  const me = await api("POST", "/api/session", { key });
  clearError();
  await showApp(me);
}

// The key of a login link (`/#key=…`), taken out of the address bar and the history.
function takeLinkKey() {
  const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return decodeURIComponent(match[1]);
}

async function signInWithLink(key) {
  try {
    await signIn(key);
  } catch (err) {
    showLogin();
    showError(err, () => signIn(key).catch((e) => showError(e)));
  }
}

// A link to someone else's key must not silently replace this session (login CSRF):
// with a session, ask first; staying is the default.
function askToSwitch(me, key) {
  el.loading.hidden = true;
  el.switchCurrent.textContent = `${me.key.name} · ${me.company.name}`;
  el.switchAccount.hidden = false;
  el.switchNo.focus();
  const answer = (switching) => {
    el.switchAccount.hidden = true;
    el.switchYes.onclick = el.switchNo.onclick = null;
    if (switching) signInWithLink(key);
    else showApp(me).catch((err) => showError(err, boot));
  };
  el.switchYes.onclick = () => answer(true);
  el.switchNo.onclick = () => answer(false);
}

async function boot() {
  const key = takeLinkKey();
  let me;
  try {
    me = await api("GET", "/api/me");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      if (key) await signInWithLink(key);
      else showLogin();
    } else {
      el.loading.hidden = true;
      showError(err, boot);
    }
    return;
  }
  if (key) askToSwitch(me, key);
  else await showApp(me);
}

el.loginForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = el.loginKey.value.trim();
  if (!key) return;
  try {
    await signIn(key);
    el.loginKey.value = "";
  } catch (err) {
    showError(err, () => el.loginForm.requestSubmit());
  }
});

el.logout.addEventListener("click", async () => {
  try {
    await api("DELETE", "/api/session");
  } catch (err) {
    showError(err, () => el.logout.click());
    return;
  }
  state.me = null;
  live.stop();
  endLive();
  state.current = null;
  state.conversations = [];
  sessionStorage.clear();
  el.conversationList.replaceChildren();
  el.messageList.replaceChildren();
  resetConversationActions();
  el.chatTitle.textContent = "No conversation selected";
  el.chatEmpty.hidden = false;
  el.chatBody.hidden = true;
  el.composer.hidden = true;
  clearError();
  showLogin();
});

// A login link opened in a tab already showing the page only changes the fragment: it
// signs nobody in (a page could do that to an open tab unseen), the key just leaves the
// address bar. Opening the link in a new tab asks as above.
window.addEventListener("hashchange", takeLinkKey);

session.ended = showLogin;
boot();
