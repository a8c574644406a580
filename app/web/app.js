// chatstream web client: plain JavaScript, no build step, no dependencies.
// It talks to the REST API (session cookie) and follows answers over one EventSource.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    loading: $("loading"),
    switchAccount: $("switch-account"),
    switchCurrent: $("switch-current"),
    switchYes: $("switch-yes"),
    switchNo: $("switch-no"),
    login: $("login"),
    loginForm: $("login-form"),
    loginKey: $("login-key"),
    app: $("app"),
    whoami: $("whoami"),
    logout: $("logout"),
    toggleConversations: $("toggle-conversations"),
    alert: $("alert"),
    alertText: $("alert-text"),
    alertRetry: $("alert-retry"),
    alertDismiss: $("alert-dismiss"),
    agentSelect: $("agent-select"),
    newConversation: $("new-conversation"),
    conversationList: $("conversation-list"),
    conversationsMore: $("conversations-more"),
    chatTitle: $("chat-title"),
    conversationActions: $("conversation-actions"),
    rename: $("rename"),
    renameForm: $("rename-form"),
    renameInput: $("rename-input"),
    renameCancel: $("rename-cancel"),
    del: $("delete"),
    deleteConfirm: $("delete-confirm"),
    deleteYes: $("delete-yes"),
    deleteNo: $("delete-no"),
    chatEmpty: $("chat-empty"),
    chatAgent: $("chat-agent"),
    conversationFilter: $("conversation-filter"),
    jumpLatest: $("jump-latest"),
    conversationFilterEmpty: $("conversation-filter-empty"),
    chatBody: $("chat-body"),
    messagesOlder: $("messages-older"),
    messageList: $("message-list"),
    composer: $("composer"),
    input: $("composer-input"),
    send: $("send"),
    stop: $("stop"),
    streamStatus: $("stream-status"),
  };

  // The note under a stopped answer whose text was kept: the same live and after a reload.
  const PARTIAL_KEPT = "Stopped. The partial answer was kept.";

  const state = {
    agentsLoaded: Promise.resolve(),
    following: true, // the messages scroll with a growing answer (false once the person scrolls up)
    scrolledTo: 0, // the chat's scrollTop where scrollToEnd last put it
    me: null,
    agents: [],
    conversations: [],
    conversationsCursor: null,
    current: null, // the selected conversation
    olderCursor: null,
    pending: null, // {conversationId, content, clientMessageId} of a send not yet confirmed
    stream: null, // {es, conversationId, generationId, bubble, text}
  };

  // -- talking to the server ------------------------------------------------------------

  class NetworkError extends Error {}

  class ApiError extends Error {
    constructor(status, body, retryAfter) {
      const message = body && typeof body.error === "string" ? body.error : `The server answered ${status}.`;
      super(message);
      this.status = status;
      this.code = body && body.code;
      this.details = body && body.details;
      this.retryAfter = retryAfter;
    }
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new NetworkError("Cannot reach the server");
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      if (response.status >= 502 && response.status <= 504 && !(data && data.error)) {
        throw new NetworkError("Cannot reach the server");
      }
      throw new ApiError(response.status, data, response.headers.get("Retry-After"));
    }
    return data;
  }

  const enc = encodeURIComponent;

  // -- the alert region -----------------------------------------------------------------

  let retryAction = null;

  function describe(err) {
    if (err instanceof NetworkError) return "Cannot reach the server. Check your connection and try again.";
    if (err instanceof ApiError) {
      let text = err.message;
      if (err.status === 429) {
        const wait = (err.details && err.details.retryAfter) || err.retryAfter;
        const seconds = Math.max(1, Math.ceil(Number(wait) || 0));
        text = "You are sending messages too fast." + (wait ? ` Try again in ${seconds} s.` : " Wait a moment and try again.");
      } else if (err.status === 404 && err.conversationGone) {
        text = "This conversation is gone: it was deleted, maybe in another tab or by someone else.";
      }
      return text;
    }
    return "Something went wrong in this page. Reload it and try again.";
  }

  function showError(err, retry) {
    if (err instanceof ApiError && err.status === 401 && state.me) {
      // The session ended (signed out elsewhere, key revoked).
      state.me = null;
      showLogin();
    }
    el.alertText.textContent = describe(err);
    retryAction = retry || null;
    el.alertRetry.hidden = !(retry && (err instanceof NetworkError || (err instanceof ApiError && err.status === 429)));
    el.alert.hidden = false;
  }

  function clearError() {
    el.alert.hidden = true;
    el.alertText.textContent = "";
    retryAction = null;
  }

  el.alertDismiss.addEventListener("click", clearError);
  el.alertRetry.addEventListener("click", () => {
    const action = retryAction;
    clearError();
    if (action) action();
  });

  // -- signing in and out ---------------------------------------------------------------

  function showLogin() {
    closeStream();
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
    state.agentsLoaded = loadAgents();
    await Promise.all([state.agentsLoaded, loadConversations(true)]);
    // After a reload: back to the conversation this tab had open.
    const saved = sessionStorage.getItem("chatstream.current");
    const conversation = saved && state.conversations.find((c) => c.id === saved);
    if (conversation && !state.current) await selectConversation(conversation);
  }

  /** Phones show one panel at a time: the conversation list, or the chat (CSS, under 700px). */
  function showConversations(on) {
    el.app.classList.toggle("show-conversations", on);
    el.toggleConversations.setAttribute("aria-expanded", String(on));
    el.toggleConversations.textContent = on ? "Back to the chat" : "Conversations";
    el.toggleConversations.disabled = on && !state.current; // nothing to go back to
  }

  el.toggleConversations.addEventListener("click", () => {
    const on = !el.app.classList.contains("show-conversations");
    showConversations(on);
    if (on) el.agentSelect.focus();
  });

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

  // -- agents and conversations ---------------------------------------------------------

  async function loadAgents() {
    try {
      state.agents = await api("GET", "/api/agents");
    } catch (err) {
      showError(err, loadAgents);
      return;
    }
    el.agentSelect.replaceChildren(
      ...state.agents.map((agent) => new Option(agent.name, agent.id)),
      new Option("No agent", ""),
    );
  }

  function agentName(agentId) {
    const agent = state.agents.find((a) => a.id === agentId);
    return agent ? agent.name : "Agent";
  }

  function conversationLabel(c) {
    return c.title || "Untitled conversation";
  }

  function formatTime(iso) {
    const date = new Date(iso);
    return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  function renderConversations() {
    // The filter matches the titles shown (of the conversations loaded so far), in any case.
    const wanted = el.conversationFilter.value.trim().toLowerCase();
    const shown = wanted
      ? state.conversations.filter((c) => conversationLabel(c).toLowerCase().includes(wanted))
      : state.conversations;
    el.conversationFilterEmpty.textContent =
      wanted && !shown.length ? "No loaded conversation has a title like that." : "";
    el.conversationList.replaceChildren(
      ...shown.map((c) => {
        const li = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.id = c.id;
        if (state.current && state.current.id === c.id) button.setAttribute("aria-current", "true");
        const title = document.createElement("span");
        title.className = "title";
        title.textContent = conversationLabel(c);
        const when = document.createElement("span");
        when.className = "when";
        when.textContent = formatTime(c.lastMessageAt);
        button.append(title, when);
        button.addEventListener("click", () => selectConversation(c));
        li.append(button);
        return li;
      }),
    );
    el.conversationsMore.hidden = !state.conversationsCursor;
  }

  async function loadConversations(reset) {
    const cursor = reset ? null : state.conversationsCursor;
    let page;
    try {
      page = await api("GET", "/api/conversations" + (cursor ? `?cursor=${enc(cursor)}` : ""));
    } catch (err) {
      showError(err, () => loadConversations(reset));
      return;
    }
    const known = new Set(reset ? [] : state.conversations.map((c) => c.id));
    state.conversations = (reset ? [] : state.conversations).concat(page.items.filter((c) => !known.has(c.id)));
    state.conversationsCursor = page.nextCursor;
    renderConversations();
  }

  el.conversationsMore.addEventListener("click", () => loadConversations(false));
  el.conversationFilter.addEventListener("input", renderConversations);

  async function createConversation() {
    await state.agentsLoaded; // a quick click while the agents load would make one without agent
    const body = {};
    if (el.agentSelect.value) body.agentId = el.agentSelect.value;
    let conversation;
    try {
      conversation = await api("POST", "/api/conversations", body);
    } catch (err) {
      showError(err, createConversation);
      return;
    }
    clearError();
    state.conversations.unshift(conversation);
    await selectConversation(conversation); // which puts the focus in the composer
  }

  el.newConversation.addEventListener("submit", (event) => {
    event.preventDefault();
    createConversation();
  });

  /** Moves a conversation to the top of the list (it has the newest activity). */
  function bumpConversation(id) {
    const index = state.conversations.findIndex((c) => c.id === id);
    if (index > 0) state.conversations.unshift(...state.conversations.splice(index, 1));
    if (index >= 0) state.conversations[0].lastMessageAt = new Date().toISOString();
    renderConversations();
  }

  /** A 404 about the conversation itself: it was deleted elsewhere. */
  function conversationGone(err, id) {
    if (!(err instanceof ApiError && err.status === 404)) return false;
    err.conversationGone = true;
    forgetConversation(id);
    return true;
  }

  function forgetConversation(id) {
    state.conversations = state.conversations.filter((c) => c.id !== id);
    sessionStorage.removeItem(`chatstream.generation.${id}`);
    if (state.current && state.current.id === id) {
      closeStream();
      state.current = null;
      sessionStorage.removeItem("chatstream.current");
      resetConversationActions();
      el.conversationActions.hidden = true;
      el.messageList.replaceChildren();
      el.messagesOlder.hidden = true;
      el.chatTitle.textContent = "No conversation selected";
      el.chatEmpty.hidden = false;
      el.chatBody.hidden = true;
      el.composer.hidden = true;
      el.chatAgent.hidden = true;
      showConversations(true);
    }
    renderConversations();
  }

  // -- renaming and deleting the selected conversation ----------------------------------

  /** Back to the plain header: no rename form, no delete question. */
  function resetConversationActions() {
    el.renameForm.hidden = true;
    el.deleteConfirm.hidden = true;
    el.chatTitle.hidden = false;
    el.conversationActions.hidden = !state.current;
    el.rename.disabled = false;
    el.del.disabled = false;
    el.deleteYes.disabled = false;
  }

  /** Puts a conversation the server answered in place of the one we had. */
  function updateConversation(updated) {
    const known = state.conversations.find((c) => c.id === updated.id);
    if (known) Object.assign(known, updated);
    if (state.current && state.current.id === updated.id) {
      if (state.current !== known) Object.assign(state.current, updated);
      el.chatTitle.textContent = conversationLabel(state.current);
    }
    renderConversations();
  }

  el.rename.addEventListener("click", () => {
    if (!state.current) return;
    resetConversationActions();
    el.conversationActions.hidden = true;
    el.chatTitle.hidden = true;
    el.renameForm.hidden = false;
    el.renameInput.value = state.current.title || "";
    el.renameInput.focus();
    el.renameInput.select();
  });

  function cancelRename() {
    resetConversationActions();
    el.rename.focus();
  }

  el.renameCancel.addEventListener("click", cancelRename);
  el.renameForm.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      cancelRename();
    }
  });

  async function saveRename() {
    const conversation = state.current;
    if (!conversation) return;
    const title = el.renameInput.value.trim();
    let updated;
    try {
      updated = await api("PATCH", `/api/conversations/${conversation.id}`, { title: title || null });
    } catch (err) {
      conversationGone(err, conversation.id);
      showError(err, saveRename);
      return;
    }
    clearError();
    updateConversation(updated);
    if (state.current === conversation) {
      resetConversationActions();
      el.rename.focus();
    }
  }

  el.renameForm.addEventListener("submit", (event) => {
    event.preventDefault();
    saveRename();
  });

  el.del.addEventListener("click", () => {
    if (!state.current) return;
    resetConversationActions();
    el.conversationActions.hidden = true;
    el.deleteConfirm.hidden = false;
    el.deleteNo.focus();
  });

  el.deleteNo.addEventListener("click", () => {
    resetConversationActions();
    el.del.focus();
  });
  el.deleteConfirm.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      el.deleteNo.click();
    }
  });

  async function deleteConversation() {
    const conversation = state.current;
    if (!conversation) return;
    el.deleteYes.disabled = true;
    try {
      await api("DELETE", `/api/conversations/${conversation.id}`);
    } catch (err) {
      el.deleteYes.disabled = false;
      // Already gone: that is what was asked for.
      if (!(err instanceof ApiError && err.status === 404)) {
        showError(err, deleteConversation);
        return;
      }
    }
    clearError();
    forgetConversation(conversation.id);
    el.newConversation.querySelector("button[type=submit]").focus();
  }

  el.deleteYes.addEventListener("click", deleteConversation);

  // -- messages -------------------------------------------------------------------------

  function messageNode(m) {
    const li = document.createElement("li");
    li.className = `message ${m.role}`;
    li.dataset.id = m.id;
    const author = document.createElement("p");
    author.className = "author";
    author.textContent =
      m.role === "user" ? "You" : m.role === "tool" ? "Tool result" : agentName(state.current && state.current.agentId);
    const content = document.createElement("p");
    content.className = "content";
    content.id = `message-${m.id}-content`;
    content.textContent = m.effectiveContent;
    li.append(author, content);
    if (m.editedAt) {
      const marker = note("edited");
      marker.classList.add("edited");
      marker.title = `Edited ${formatTime(m.editedAt)}`;
      li.append(marker);
    }
    if (m.status === "partial") {
      li.classList.add("stopped");
      li.append(note(PARTIAL_KEPT)); // as it read live (see openStream)
    }
    addMessageActions(li, m);
    return li;
  }

  /** Who may edit: the author of a user message, or an admin (any message, agents' too). */
  function canEdit(m) {
    if (!state.me || !m.id) return false;
    if (state.me.role === "admin") return true;
    return m.role === "user" && m.authorId === state.me.userId;
  }

  /** The buttons under a message: Copy (an agent's answer), Edit (for those who may). */
  function addMessageActions(li, m) {
    const buttons = [];
    if (m.role === "agent") buttons.push(actionButton("Copy", "copy", m, () => copyAnswer(li)));
    if (canEdit(m)) buttons.push(actionButton("Edit", "edit", m, () => startEdit(li, m)));
    if (!buttons.length) return;
    const actions = document.createElement("div");
    actions.className = "message-actions";
    actions.append(...buttons);
    li.append(actions);
  }

  function actionButton(text, className, m, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `secondary ${className}`;
    button.textContent = text;
    button.setAttribute("aria-describedby", `message-${m.id}-content`);
    button.addEventListener("click", onClick);
    return button;
  }

  /** Puts the answer's text (as shown) on the clipboard; the button says so for a moment. */
  async function copyAnswer(li) {
    const button = li.querySelector(".message-actions .copy");
    const content = li.querySelector(".content");
    try {
      await navigator.clipboard.writeText(content ? content.textContent : "");
    } catch (err) {
      showError(new Error("Copying failed: this browser did not allow the page to use the clipboard."));
      return;
    }
    button.textContent = "Copied";
    setTimeout(() => {
      button.textContent = "Copy";
    }, 2000);
  }

  function startEdit(li, m) {
    if (li.querySelector(".message-edit")) return;
    const content = li.querySelector(".content");
    const actions = li.querySelector(".message-actions");
    const form = document.createElement("form");
    form.className = "message-edit";
    const boxId = `message-${m.id}-edit`;
    const hintId = `message-${m.id}-edit-hint`;
    const label = document.createElement("label");
    label.htmlFor = boxId;
    label.textContent = "Edit message";
    const box = document.createElement("textarea");
    box.id = boxId;
    box.rows = 3;
    box.value = content ? content.textContent : m.effectiveContent;
    box.setAttribute("aria-describedby", hintId);
    const hint = document.createElement("p");
    hint.id = hintId;
    hint.className = "hint";
    hint.textContent = "Ctrl+Enter saves, Escape cancels.";
    const row = document.createElement("div");
    row.className = "row-actions";
    const save = document.createElement("button");
    save.type = "submit";
    save.textContent = "Save";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "secondary";
    cancel.textContent = "Cancel";
    row.append(save, cancel);
    form.append(label, box, hint, row);

    const stop = () => {
      form.remove();
      if (content) content.hidden = false;
      if (actions) {
        actions.hidden = false;
        actions.querySelector(".edit").focus();
      }
    };
    const submit = async () => {
      save.disabled = true;
      let updated;
      try {
        updated = await api("PUT", `/api/conversations/${m.conversationId}/messages/${m.id}`, {
          content: box.value,
        });
      } catch (err) {
        save.disabled = false;
        showError(err, submit);
        return;
      }
      clearError();
      const replacement = messageNode(updated);
      li.replaceWith(replacement);
      const again = replacement.querySelector(".message-actions .edit");
      if (again) again.focus();
    };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submit();
    });
    cancel.addEventListener("click", stop);
    form.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        stop();
      } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target === box) {
        event.preventDefault();
        submit();
      }
    });

    if (content) content.hidden = true;
    if (actions) actions.hidden = true;
    li.insertBefore(form, actions || null);
    box.focus();
  }

  function note(text) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = text;
    return p;
  }

  /**
   * Shows the newest message: always when `force` (the person opened a conversation or sent
   * something), else only while they are at the end; one who scrolled up to read is left there
   * and offered "Jump to latest".
   */
  function scrollToEnd(force = false) {
    if (!force && !state.following) {
      el.jumpLatest.hidden = false;
      return;
    }
    el.chatBody.scrollTop = el.chatBody.scrollHeight;
    state.scrolledTo = el.chatBody.scrollTop;
    state.following = true;
    el.jumpLatest.hidden = true;
  }

  el.chatBody.addEventListener("scroll", () => {
    // Scroll events arrive a frame late: by then the answer may have grown, so "not at the end"
    // alone does not mean the person scrolled; above where this page last scrolled to does.
    const body = el.chatBody;
    if (body.scrollHeight - body.scrollTop - body.clientHeight < 40) {
      state.following = true;
      el.jumpLatest.hidden = true;
    } else if (body.scrollTop < state.scrolledTo - 2) {
      state.following = false;
    }
  });

  el.jumpLatest.addEventListener("click", () => scrollToEnd(true));

  /** Says who answers in this conversation, or that nobody will (it has no agent). */
  function showWhoAnswers(conversation) {
    el.chatAgent.textContent = conversation.agentId
      ? `Answers come from ${agentName(conversation.agentId)}.`
      : "This conversation has no agent: nobody will answer here. Start a new conversation with an agent to get answers.";
    el.chatAgent.hidden = false;
  }

  async function selectConversation(conversation) {
    if (state.current && state.current.id === conversation.id) {
      showConversations(false); // back to it, on a phone
      el.input.focus();
      return;
    }
    closeStream();
    state.current = conversation;
    state.olderCursor = null;
    sessionStorage.setItem("chatstream.current", conversation.id);
    renderConversations();
    el.chatTitle.textContent = conversationLabel(conversation);
    resetConversationActions();
    el.chatEmpty.hidden = true;
    el.chatBody.hidden = false;
    el.composer.hidden = false;
    showWhoAnswers(conversation);
    showConversations(false);
    el.input.focus(); // opening a conversation is to write in it
    el.messageList.replaceChildren();
    setStreaming(false);
    let page;
    try {
      page = await api("GET", `/api/conversations/${conversation.id}/messages`);
    } catch (err) {
      conversationGone(err, conversation.id);
      showError(err, () => {
        state.current = null;
        selectConversation(conversation);
      });
      return;
    }
    if (!state.current || state.current.id !== conversation.id) return;
    el.messageList.replaceChildren(...page.items.map(messageNode));
    state.olderCursor = page.nextCursor;
    el.messagesOlder.hidden = !page.nextCursor;
    scrollToEnd(true);
    resumeIfAnswering(conversation, page.items);
  }

  /** After a reload: follow an answer that was streaming (from its start, so it shows whole). */
  function resumeIfAnswering(conversation, items) {
    const saved = sessionStorage.getItem(`chatstream.generation.${conversation.id}`);
    const last = items[items.length - 1];
    if (saved && last && last.role === "agent" && last.generationId === saved) {
      sessionStorage.removeItem(`chatstream.generation.${conversation.id}`);
    } else if (saved) {
      openStream(conversation.id, saved);
    } else if (last && last.role === "user") {
      // An answer may be running (sent from another tab): follow it from its start.
      // Without a cursor the server answers 204 when nothing runs, and the stream closes quietly.
      openStream(conversation.id, null);
    }
  }

  el.messagesOlder.addEventListener("click", async () => {
    const conversation = state.current;
    if (!conversation || !state.olderCursor) return;
    let page;
    try {
      page = await api("GET", `/api/conversations/${conversation.id}/messages?before=${enc(state.olderCursor)}`);
    } catch (err) {
      showError(err, () => el.messagesOlder.click());
      return;
    }
    if (state.current !== conversation) return;
    const before = el.chatBody.scrollHeight;
    el.messageList.prepend(...page.items.map(messageNode));
    el.chatBody.scrollTop += el.chatBody.scrollHeight - before;
    state.olderCursor = page.nextCursor;
    el.messagesOlder.hidden = !page.nextCursor;
  });

  // -- sending --------------------------------------------------------------------------

  function newId() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, (ch) => {
      const r = (Math.random() * 16) | 0;
      return (ch === "x" ? r : (r & 0x3) | 0x8).toString(16);
    });
  }

  async function send() {
    const conversation = state.current;
    if (!conversation) return;
    const content = el.input.value;
    if (!content.trim()) return;
    // A retry of the same text keeps its clientMessageId, so the server stores it once.
    if (!state.pending || state.pending.conversationId !== conversation.id || state.pending.content !== content) {
      state.pending = { conversationId: conversation.id, content, clientMessageId: newId() };
    }
    const pending = state.pending;
    el.send.disabled = true;
    let posted;
    try {
      posted = await api("POST", `/api/conversations/${conversation.id}/messages`, {
        content,
        clientMessageId: pending.clientMessageId,
      });
    } catch (err) {
      conversationGone(err, conversation.id);
      showError(err, send);
      return;
    } finally {
      el.send.disabled = false;
    }
    state.pending = null;
    clearError();
    if (el.input.value === content) el.input.value = "";
    if (state.current !== conversation) return;
    if (!el.messageList.querySelector(`[data-id="${posted.message.id}"]`)) {
      el.messageList.append(messageNode(posted.message));
    }
    bumpConversation(conversation.id);
    scrollToEnd(true);
    if (posted.generation && posted.generation.status === "running") {
      openStream(conversation.id, posted.generation.id);
    }
  }

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });

  el.input.addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter (and Enter while an input method composes) is a new line.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey) {
      event.preventDefault();
      send();
    }
  });

  // -- the answer stream (one EventSource per tab) --------------------------------------

  function setStreaming(on, text) {
    el.stop.hidden = !on;
    el.stop.disabled = false;
    el.streamStatus.textContent = text || "";
  }

  function closeStream() {
    const s = state.stream;
    if (!s) return;
    state.stream = null;
    s.es.close();
    if (s.bubble.hidden) s.bubble.remove(); // a watched stream that never showed anything
    if (s.bubble.classList.contains("streaming")) {
      s.bubble.classList.remove("streaming");
      s.bubble.removeAttribute("aria-busy");
    }
    setStreaming(false);
  }

  /**
   * Follows an answer in a live bubble. With a generationId: that answer from its start. Without
   * one (null): whatever runs now in the conversation, from its start; the bubble stays hidden
   * until the first event, and a 204 (nothing runs) closes the stream quietly.
   */
  function openStream(conversationId, generationId) {
    closeStream();
    const storageKey = `chatstream.generation.${conversationId}`;
    const watching = !generationId;
    if (!watching) sessionStorage.setItem(storageKey, generationId);
    const bubble = document.createElement("li");
    bubble.className = "message agent streaming live";
    if (!watching) bubble.dataset.generationId = generationId;
    bubble.hidden = watching;
    bubble.setAttribute("aria-live", "polite");
    bubble.setAttribute("aria-busy", "true");
    const author = document.createElement("p");
    author.className = "author";
    author.textContent = agentName(state.current && state.current.agentId);
    const content = document.createElement("p");
    content.className = "content";
    bubble.append(author, content);
    el.messageList.append(bubble);
    scrollToEnd();

    // From the answer's start (seq 0): the whole answer, exactly once; the browser resumes
    // with Last-Event-ID if the connection drops.
    const base = `/api/conversations/${conversationId}/stream`;
    const es = new EventSource(watching ? base : `${base}?after=${enc(generationId)}.0`);
    const s = { es, conversationId, generationId, bubble, text: "" };
    state.stream = s;
    if (!watching) setStreaming(true, "Answering…");

    /** The first event of a watched answer names it: from then on it is like one we sent. */
    const adopt = (data) => {
      if (s.generationId || !data || !data.generationId) return;
      s.generationId = generationId = data.generationId;
      bubble.dataset.generationId = generationId;
      sessionStorage.setItem(storageKey, generationId);
      bubble.hidden = false;
      setStreaming(true, "Answering…");
      scrollToEnd();
    };

    const render = () => {
      content.textContent = s.text;
      scrollToEnd();
    };
    const finish = (cls, message, ended = true) => {
      if (state.stream !== s) return;
      // The answer is over: nothing to resume after a reload.
      if (ended) sessionStorage.removeItem(storageKey);
      bubble.classList.remove("streaming", "live");
      bubble.removeAttribute("aria-busy");
      if (cls) bubble.classList.add(cls);
      // Above the answer's buttons, where a reload shows it too.
      if (message) bubble.insertBefore(note(message), bubble.querySelector(".message-actions"));
      scrollToEnd(); // the note under the answer too
      closeStream();
    };
    const parse = (event) => {
      try {
        return JSON.parse(event.data);
      } catch (err) {
        return null;
      }
    };

    es.addEventListener("open", () => {
      if (state.stream === s && s.generationId) el.streamStatus.textContent = "Answering…";
    });
    es.addEventListener("start", (event) => {
      if (state.stream === s) adopt(parse(event));
    });
    es.addEventListener("token", (event) => {
      const data = parse(event);
      if (!data || state.stream !== s) return;
      adopt(data);
      s.text += data.text;
      render();
    });
    es.addEventListener("snapshot", (event) => {
      const data = parse(event);
      if (!data || state.stream !== s) return;
      adopt(data);
      s.text = data.text;
      render();
    });
    es.addEventListener("done", (event) => {
      const data = parse(event);
      if (state.stream !== s) return;
      adopt(data);
      if (data && data.messageId) {
        const stored = el.messageList.querySelector(`.message[data-id="${data.messageId}"]`);
        if (stored && stored !== bubble) bubble.remove();
        bubble.dataset.id = data.messageId;
        streamedEditControl(bubble, data.messageId, conversationId, s.text);
      }
      finish(null, null);
    });
    es.addEventListener("cancelled", (event) => {
      const data = parse(event);
      if (state.stream !== s) return;
      adopt(data);
      const kept = data && data.messageId;
      if (kept) {
        bubble.dataset.id = data.messageId;
        streamedEditControl(bubble, data.messageId, conversationId, s.text);
      }
      finish("stopped", kept ? PARTIAL_KEPT : "Stopped. The answer was discarded.");
    });
    es.addEventListener("error", (event) => {
      if (state.stream !== s || unloading) return;
      if (event.data) {
        // The server's terminal `error` event: the answer failed.
        const data = parse(event);
        finish("failed", `The answer failed: ${(data && data.message) || "unknown error"}`);
        return;
      }
      if (es.readyState === EventSource.CLOSED && !s.generationId) {
        // Watching, and nothing runs (204) or the stream was refused: nothing to show.
        bubble.remove();
        finish(null, null, false);
        return;
      }
      if (es.readyState === EventSource.CLOSED) {
        // Refused (an error answer) or nothing to stream (204): find out which, to say why.
        finish(null, null, false);
        api("GET", `/api/generations/${generationId}`).then(
          (gen) => {
            if (gen.status === "running") {
              showError(new NetworkError(), () => openStream(conversationId, generationId));
            } else {
              sessionStorage.removeItem(storageKey);
            }
          },
          (err) => showError(err, () => openStream(conversationId, generationId)),
        );
      } else {
        // The browser reconnects by itself, sending Last-Event-ID.
        el.streamStatus.textContent = "Connection lost, reconnecting…";
      }
    });
  }

  /** A streamed answer, once stored, gets the same edit control a loaded one has (admins). */
  function streamedEditControl(bubble, messageId, conversationId, text) {
    const content = bubble.querySelector(".content");
    if (content) content.id = `message-${messageId}-content`;
    addMessageActions(bubble, { id: messageId, conversationId, role: "agent", effectiveContent: text });
  }

  document.addEventListener("keydown", (event) => {
    // Escape stops a running answer, unless it is closing something else first (a rename, an
    // edit or the delete question handle their own Escape).
    if (event.key !== "Escape" || event.defaultPrevented || el.stop.hidden || el.stop.disabled) return;
    const owner = event.target instanceof Element ? event.target.closest("form, [role=group]") : null;
    if (owner && owner !== el.composer) return;
    event.preventDefault();
    el.stop.click();
  });

  el.stop.addEventListener("click", async () => {
    const s = state.stream;
    if (!s) return;
    el.stop.disabled = true;
    el.streamStatus.textContent = "Stopping…";
    try {
      await api("POST", `/api/generations/${s.generationId}/cancel`);
    } catch (err) {
      el.stop.disabled = false;
      showError(err, () => el.stop.click());
    }
    // The `cancelled` event on the stream finishes the bubble.
  });

  let unloading = false;
  window.addEventListener("beforeunload", () => {
    unloading = true;
  });
  window.addEventListener("pagehide", () => {
    unloading = true;
    if (state.stream) state.stream.es.close();
  });

  // A login link opened in a tab already showing the page only changes the fragment: it
  // signs nobody in (a page could do that to an open tab unseen), the key just leaves the
  // address bar. Opening the link in a new tab asks as above.
  window.addEventListener("hashchange", takeLinkKey);

  boot();
})();
