// The SAI-IM web client: plain JavaScript over the HTTP API (/v1/...) and the WebSocket
// protocol (docs/protocol.md). Served by sai-im itself; no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 30; // messages per history page
const CLOSE = { replaced: 4001, revoked: 4004, disabled: 4005 };

const state = {
  token: null,
  me: null, // {userId, username}
  names: new Map(), // userId -> display name
  friends: [],
  convs: new Map(), // conversationId -> conversation (see conv())
  open: null, // the open conversationId
  ws: null,
  wsUrl: null,
  online: false,
  stopped: false, // replaced, logged out: no reconnect
  retry: 0,
  nextId: 1,
  calls: new Map(), // frame id -> {resolve, reject}: requests waiting for their answer
  pending: new Map(), // clientMsgId -> {cid, frame}: sent, not acked yet (resent on reconnect)
  groupTimer: null,
};

// ---------------------------------------------------------------- HTTP

async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  if (state.token) headers.authorization = "Bearer " + state.token;
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = new Error(data.message || resp.statusText);
    err.code = data.code;
    err.status = resp.status;
    if (resp.status === 401 && state.token) loggedOut("Your session ended: log in again.");
    throw err;
  }
  return data;
}

async function nameOf(userId) {
  if (state.names.has(userId)) return state.names.get(userId);
  try {
    const u = await api("GET", "/v1/users/" + encodeURIComponent(userId));
    state.names.set(userId, u.nickname || u.username);
  } catch {
    state.names.set(userId, userId);
  }
  return state.names.get(userId);
}

// ---------------------------------------------------------------- sign in

async function signIn(register) {
  const username = $("auth-username").value.trim();
  const password = $("auth-password").value;
  $("auth-error").textContent = "";
  try {
    if (register) await api("POST", "/v1/users/register", { username, password, nickname: username });
    const s = await api("POST", "/v1/users/login", { username, password });
    sessionStorage.setItem("sai", JSON.stringify({ token: s.token, userId: s.userId, username }));
    await start(s.token, s.userId, username);
  } catch (e) {
    $("auth-error").textContent = e.message;
  }
}

async function start(token, userId, username) {
  Object.assign(state, { token, me: { userId, username }, stopped: false });
  state.names.set(userId, username);
  $("me-name").textContent = username;
  $("auth-view").hidden = true;
  $("main-view").hidden = false;
  const client = await api("GET", "/client.json");
  const override = new URLSearchParams(location.search).get("ws");
  state.wsUrl = override || `${location.protocol === "https:" ? "wss" : "ws"}://${location.hostname}:${client.wsPort}/ws`;
  await Promise.all([loadFriends(), loadRequests(), loadConversations()]);
  connect();
}

function loggedOut(why) {
  state.stopped = true;
  state.token = null;
  sessionStorage.removeItem("sai");
  if (state.ws) state.ws.close();
  location.hash = "";
  $("main-view").hidden = true;
  $("auth-view").hidden = false;
  $("auth-error").textContent = why || "";
}

// ---------------------------------------------------------------- WebSocket

function setOnline(on) {
  state.online = on;
  $("conn-state").classList.toggle("online", on);
  $("conn-state").title = on ? "connected" : "reconnecting";
  document.body.dataset.online = on ? "yes" : "no";
}

function banner(text, action) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
  if (action) {
    const btn = document.createElement("button");
    btn.textContent = action.label;
    btn.onclick = action.run;
    b.append(btn);
  }
}

function connect() {
  if (state.stopped) return;
  // The token rides in Sec-WebSocket-Protocol: the one header a browser can set.
  const ws = new WebSocket(state.wsUrl, [state.token]);
  state.ws = ws;
  ws.onopen = () => {
    state.retry = 0;
    setOnline(true);
    banner(null);
    resync();
  };
  ws.onmessage = (ev) => {
    let f;
    try {
      f = JSON.parse(ev.data);
    } catch {
      return;
    }
    onFrame(f);
  };
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    setOnline(false);
    for (const c of state.calls.values()) c.reject(new Error("disconnected"));
    state.calls.clear();
    if (ev.code === CLOSE.replaced) {
      state.stopped = true;
      banner("You signed in somewhere else, so this window was disconnected.", {
        label: "Use it here",
        run: () => {
          state.stopped = false;
          banner(null);
          connect();
        },
      });
      return;
    }
    if (ev.code === CLOSE.revoked || ev.code === CLOSE.disabled) {
      loggedOut(ev.code === CLOSE.disabled ? "This account was disabled." : "Your session ended: log in again.");
      return;
    }
    if (state.stopped) return;
    // 1012 (server restart) and drops alike: back off 0.5 s, 1 s, 2 s ... 8 s, with jitter.
    const wait = Math.min(8000, 500 * 2 ** state.retry++) * (0.75 + Math.random() / 2);
    banner("Connection lost: reconnecting…");
    setTimeout(connect, wait);
  };
}

function send(frame) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(frame));
}

// A request that waits for its answer (sync).
function call(method, data) {
  const id = "r" + state.nextId++;
  return new Promise((resolve, reject) => {
    state.calls.set(id, { resolve, reject });
    send({ frameType: 0, id, method, data });
  });
}

function onFrame(f) {
  const type = f.frameType || 0;
  if (type === 1) return;
  if (type === 9) return onError(f);
  if (type === 2) return onAck(f);
  if (f.method === "push") {
    // Rigor mode wants every push acked; other modes ignore the ack.
    if (f.id) send({ frameType: 2, id: f.id });
    return onPush(f.data, true);
  }
  if (f.id && state.calls.has(f.id)) {
    state.calls.get(f.id).resolve(f.data);
    state.calls.delete(f.id);
    return;
  }
  if (f.method === "conversation.read") return onRead(f.data);
  if (f.method === "friend.request") {
    loadRequests();
    return;
  }
  if (f.method === "friend.accepted") {
    loadFriends();
    nameOf(f.data.userId).then((n) => status(`${n} accepted your friend request`));
  }
}

function onError(f) {
  const call_ = f.id && state.calls.get(f.id);
  if (call_) {
    state.calls.delete(f.id);
    call_.reject(new Error(f.errMsg));
    return;
  }
  const p = f.id && state.pending.get(f.id);
  if (p) {
    state.pending.delete(f.id);
    const m = conv(p.cid).local.get(f.id);
    if (m) {
      m.status = "failed";
      m.error = (f.data && f.data.code) || f.errMsg;
      renderMessages();
    }
  }
}

function onAck(f) {
  const d = f.data || {};
  if (d.readSeq !== undefined) return; // a markChat ack
  const p = state.pending.get(f.id);
  if (!p) return;
  state.pending.delete(f.id);
  const c = conv(d.conversationId);
  const m = c.local.get(f.id);
  c.local.delete(f.id);
  if (m) {
    Object.assign(m, { seq: d.seq, msgId: d.msgId, sendTime: d.sendTime, status: "sent" });
    if (c.peerReadSeq >= d.seq) m.status = "read";
    addMessage(c, m);
  }
  renderConversations();
  if (state.open === c.id) renderMessages();
}

// After every (re)connect: resend what was not acked, push what was missed, refresh the lists.
async function resync() {
  for (const p of state.pending.values()) send(p.frame);
  const known = {};
  for (const c of state.convs.values()) known[c.id] = c.maxSeq;
  try {
    await call("conversation.sync", { conversations: known });
  } catch {
    return; // dropped again: the next connect syncs
  }
  await Promise.all([loadConversations(), loadRequests(), loadFriends()]);
  if (state.open) markRead(conv(state.open));
}

// ---------------------------------------------------------------- conversations and messages

function privateId(a, b) {
  return a < b ? `si_${a}_${b}` : `si_${b}_${a}`;
}

function conv(id) {
  let c = state.convs.get(id);
  if (!c) {
    c = {
      id,
      chatType: id.startsWith("sg_") ? 1 : 2,
      peerId: null,
      groupId: id.startsWith("sg_") ? id.slice(3) : null,
      title: id,
      msgs: new Map(), // seq -> message: one per seq whatever arrives twice
      local: new Map(), // clientMsgId -> own message not acked yet
      loaded: false,
      oldest: null,
      complete: false,
      maxSeq: 0,
      readSeq: 0,
      peerReadSeq: 0,
      unread: 0,
      last: null,
    };
    if (c.chatType === 2 && state.me) {
      const [a, b] = id.slice(3).split("_");
      c.peerId = a === state.me.userId ? b : a;
    }
    state.convs.set(id, c);
  }
  return c;
}

async function titleOf(c) {
  if (c.chatType === 2 && c.peerId) c.title = await nameOf(c.peerId);
  else if (c.groupId && c.title === c.id) {
    try {
      c.title = (await api("GET", "/v1/groups/" + encodeURIComponent(c.groupId))).name;
    } catch {
      /* left the group: keep the id */
    }
  }
  return c.title;
}

function addMessage(c, m) {
  if (m.seq === undefined) return;
  const had = c.msgs.get(m.seq);
  c.msgs.set(m.seq, had ? Object.assign(had, m) : m);
  if (c.oldest === null || m.seq < c.oldest) c.oldest = m.seq;
  if (m.seq > c.maxSeq) c.maxSeq = m.seq;
  if (!c.last || m.seq >= c.last.seq) c.last = m;
}

function onPush(d, live) {
  const c = conv(d.conversationId);
  const fresh = d.seq > c.maxSeq && !c.msgs.has(d.seq);
  const mine = d.sendId === state.me.userId;
  if (mine && d.clientMsgId && c.local.has(d.clientMsgId)) {
    c.local.delete(d.clientMsgId);
    state.pending.delete(d.clientMsgId);
  }
  addMessage(c, { ...d, status: mine ? (c.peerReadSeq >= d.seq ? "read" : "sent") : undefined });
  if (fresh && !mine && state.open !== c.id) c.unread++;
  if (c.title === c.id) titleOf(c).then(renderConversations);
  if (live) {
    renderConversations();
    if (state.open === c.id) {
      renderMessages(true);
      markRead(c);
    }
  }
}

function onRead(d) {
  const c = conv(d.conversationId);
  if (d.readerId === state.me.userId) return;
  c.peerReadSeq = Math.max(c.peerReadSeq, d.readSeq);
  for (const m of c.msgs.values()) if (m.sendId === state.me.userId && m.seq <= c.peerReadSeq) m.status = "read";
  if (state.open === c.id) renderMessages();
}

async function loadConversations() {
  const { conversations } = await api("GET", "/v1/conversations?limit=200");
  for (const e of conversations) {
    const c = conv(e.conversationId);
    if (e.peerId) c.peerId = e.peerId;
    c.unread = state.open === c.id ? 0 : e.unread;
    c.readSeq = e.readSeq;
    if (e.maxSeq > c.maxSeq && !c.loaded) c.maxSeq = e.maxSeq;
    if (e.lastMessage && (!c.last || e.lastMessage.seq >= c.last.seq)) c.last = e.lastMessage;
    await titleOf(c);
  }
  renderConversations();
}

async function loadFriends() {
  const { friends } = await api("GET", "/v1/friends");
  state.friends = friends;
  for (const f of friends) state.names.set(f.userId, f.nickname || f.username);
  renderFriends();
}

async function loadRequests() {
  const { requests } = await api("GET", "/v1/friends/requests");
  const ul = $("requests");
  ul.replaceChildren();
  for (const r of requests) {
    const li = document.createElement("li");
    li.dataset.requestId = r.requestId;
    const who = document.createElement("span");
    who.textContent = await nameOf(r.fromUserId);
    const yes = button("Accept", () => answerRequest(r.requestId, "accept"));
    const no = button("Reject", () => answerRequest(r.requestId, "reject"), true);
    li.append(who, yes, no);
    ul.append(li);
  }
  $("requests-box").hidden = requests.length === 0;
}

async function answerRequest(id, verb) {
  await api("POST", `/v1/friends/requests/${encodeURIComponent(id)}/${verb}`);
  await Promise.all([loadRequests(), loadFriends()]);
}

function button(label, run, plain) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (plain) b.className = "plain";
  b.onclick = run;
  return b;
}

function status(text) {
  $("friend-status").textContent = text;
}

async function requestFriend(username) {
  try {
    const { users } = await api("GET", "/v1/users?username=" + encodeURIComponent(username));
    if (users.length === 0) return status(`No user named ${username}`);
    await api("POST", "/v1/friends/requests", { toUserId: users[0].userId, message: "" });
    status(`Request sent to ${username}`);
  } catch (e) {
    status(e.message);
  }
}

async function openConversation(id) {
  const c = conv(id);
  state.open = id;
  c.unread = 0;
  await titleOf(c);
  $("chat").hidden = false;
  $("chat-title").textContent = c.title;
  $("readers").hidden = true;
  $("add-member-form").hidden = c.chatType !== 1;
  if (c.chatType === 1) fillMemberChoices(c);
  if (!c.loaded) await loadOlder(c);
  renderConversations();
  renderMessages(true);
  markRead(c);
  clearInterval(state.groupTimer);
  // Group read counts change as members read: refresh the newest page while the group is open.
  if (c.chatType === 1) state.groupTimer = setInterval(() => refreshReadCounts(c), 2000);
  $("composer-text").focus();
}

async function fetchPage(c, beforeSeq, limit) {
  let q = `?limit=${limit}`;
  if (beforeSeq) q += `&beforeSeq=${beforeSeq}`;
  const { messages } = await api("GET", `/v1/conversations/${encodeURIComponent(c.id)}/messages${q}`);
  return messages;
}

async function loadOlder(c) {
  let messages = [];
  try {
    messages = await fetchPage(c, c.loaded ? c.oldest : null, PAGE);
  } catch (e) {
    // A group nobody has written in yet has no conversation state on the server: empty.
    if (e.code !== "not_a_member" || c.maxSeq > 0) throw e;
  }
  c.loaded = true;
  for (const m of messages) {
    addMessage(c, m);
    if (m.status === "read") c.peerReadSeq = Math.max(c.peerReadSeq, m.seq);
  }
  if (messages.length < PAGE || c.oldest <= 1) c.complete = true;
}

async function refreshReadCounts(c) {
  if (state.open !== c.id || !state.online) return;
  const messages = await fetchPage(c, null, PAGE).catch(() => []);
  let changed = false;
  for (const m of messages) {
    const had = c.msgs.get(m.seq);
    if (had && m.readCount !== undefined && had.readCount !== m.readCount) {
      had.readCount = m.readCount;
      changed = true;
    }
  }
  if (changed) renderMessages();
}

function markRead(c) {
  if (c.maxSeq > c.readSeq && document.visibilityState === "visible") {
    c.readSeq = c.maxSeq;
    send({ frameType: 0, id: "k" + state.nextId++, method: "conversation.markChat", data: { conversationId: c.id, readSeq: c.maxSeq } });
  }
}

function sendMessage(text) {
  const c = conv(state.open);
  const clientMsgId = `${state.me.userId}-${Date.now().toString(36)}-${(state.nextId++).toString(36)}`;
  const chat = { chatType: c.chatType, recvId: c.chatType === 1 ? c.groupId : c.peerId, clientMsgId, msg: { text } };
  // The frame id is the clientMsgId: a resend after a reconnect is the same request, and
  // the server answers it with the original's ack.
  const frame = { frameType: 0, id: clientMsgId, method: "conversation.chat", data: chat };
  c.local.set(clientMsgId, { clientMsgId, sendId: state.me.userId, msg: { text }, sendTime: Date.now(), status: "pending" });
  state.pending.set(clientMsgId, { cid: c.id, frame });
  send(frame);
  renderMessages(true);
}

async function fillMemberChoices(c) {
  const sel = $("add-member-select");
  let members = [];
  try {
    members = (await api("GET", `/v1/groups/${encodeURIComponent(c.groupId)}/members`)).members.map((m) => m.userId);
  } catch {
    /* not a member any more */
  }
  sel.replaceChildren();
  for (const f of state.friends) {
    if (members.includes(f.userId)) continue;
    const o = document.createElement("option");
    o.value = f.userId;
    o.textContent = f.nickname || f.username;
    sel.append(o);
  }
}

async function showReaders(c, seq) {
  const r = await api("GET", `/v1/conversations/${encodeURIComponent(c.id)}/messages/${seq}/reads`);
  const names = await Promise.all(r.readerIds.map(nameOf));
  const box = $("readers");
  box.hidden = false;
  box.textContent = `Read by ${r.readCount}${names.length ? ": " + names.join(", ") : ""} · unread ${r.unreadCount}`;
}

// ---------------------------------------------------------------- rendering

function text(m) {
  if (m.msg && typeof m.msg.text === "string") return m.msg.text;
  return JSON.stringify(m.msg);
}

function renderConversations() {
  const ul = $("conversations");
  const list = [...state.convs.values()].filter((c) => c.last || c.local.size || c.id === state.open);
  list.sort((a, b) => (b.last ? b.last.sendTime : Infinity) - (a.last ? a.last.sendTime : Infinity));
  ul.replaceChildren(
    ...list.map((c) => {
      const li = document.createElement("li");
      li.dataset.conversationId = c.id;
      li.classList.toggle("active", c.id === state.open);
      const main = document.createElement("div");
      main.className = "conv-main";
      const name = document.createElement("div");
      name.className = "conv-name";
      name.textContent = c.title;
      const last = document.createElement("div");
      last.className = "conv-last";
      last.textContent = c.last ? text(c.last) : "";
      main.append(name, last);
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = c.unread > 0 ? String(c.unread) : "";
      li.append(main, badge);
      li.onclick = () => openConversation(c.id);
      return li;
    }),
  );
}

function renderFriends() {
  $("friends").replaceChildren(
    ...state.friends.map((f) => {
      const li = document.createElement("li");
      li.dataset.userId = f.userId;
      li.textContent = f.nickname || f.username;
      li.onclick = () => openConversation(privateId(state.me.userId, f.userId));
      return li;
    }),
  );
  $("group-friends").replaceChildren(
    ...state.friends.map((f) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = f.userId;
      label.append(box, " ", f.nickname || f.username);
      return label;
    }),
  );
}

function renderMessages(toBottom) {
  if (!state.open) return;
  const c = conv(state.open);
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const ordered = [...c.msgs.values()].sort((a, b) => a.seq - b.seq).concat([...c.local.values()]);
  $("message-list").replaceChildren(...ordered.map((m) => renderMessage(c, m)));
  $("older-btn").hidden = c.complete;
  if (toBottom || atBottom) box.scrollTop = box.scrollHeight;
}

function renderMessage(c, m) {
  const li = document.createElement("li");
  const mine = m.sendId === state.me.userId;
  li.className = "msg" + (mine ? " mine" : "");
  if (m.seq !== undefined) li.dataset.seq = m.seq;
  li.dataset.clientMsgId = m.clientMsgId || "";
  if (c.chatType === 1 && !mine) {
    const from = document.createElement("div");
    from.className = "from";
    from.textContent = state.names.get(m.sendId) || m.sendId;
    if (!state.names.has(m.sendId)) nameOf(m.sendId).then(() => renderMessages());
    li.append(from);
  }
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text(m);
  const meta = document.createElement("div");
  meta.className = "meta";
  const time = m.sendTime ? new Date(m.sendTime).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
  meta.append(time);
  if (mine) {
    if (c.chatType === 2 || m.status === "pending" || m.status === "failed") {
      const st = document.createElement("span");
      const s = m.status === "received" ? "sent" : m.status || "sent";
      st.className = "status " + s;
      st.textContent = " · " + (s === "failed" ? `failed (${m.error})` : s);
      meta.append(st);
    } else {
      const reads = document.createElement("button");
      reads.type = "button";
      reads.className = "reads";
      reads.textContent = `read by ${m.readCount || 0}`;
      reads.onclick = () => showReaders(c, m.seq);
      meta.append(" · ", reads);
    }
  }
  li.append(body, meta);
  return li;
}

// ---------------------------------------------------------------- wiring

$("auth-form").onsubmit = (e) => {
  e.preventDefault();
  signIn(false);
};
$("register-btn").onclick = () => signIn(true);
$("logout-btn").onclick = async () => {
  await api("POST", "/v1/users/logout").catch(() => {});
  loggedOut("");
};
$("friend-form").onsubmit = (e) => {
  e.preventDefault();
  const input = $("friend-username");
  requestFriend(input.value.trim());
  input.value = "";
};
$("group-form").onsubmit = async (e) => {
  e.preventDefault();
  const memberIds = [...$("group-friends").querySelectorAll("input:checked")].map((b) => b.value);
  try {
    const { groupId } = await api("POST", "/v1/groups", { name: $("group-name").value.trim(), memberIds });
    $("group-name").value = "";
    $("new-group").open = false;
    await openConversation("sg_" + groupId);
  } catch (err) {
    status(err.message);
  }
};
$("add-member-form").onsubmit = async (e) => {
  e.preventDefault();
  const c = conv(state.open);
  const userId = $("add-member-select").value;
  if (!userId) return;
  try {
    await api("POST", `/v1/groups/${encodeURIComponent(c.groupId)}/members`, { userIds: [userId] });
  } catch (err) {
    status(err.message);
  }
  fillMemberChoices(c);
};
$("composer").onsubmit = (e) => {
  e.preventDefault();
  const input = $("composer-text");
  const t = input.value.trim();
  if (!t || !state.open) return;
  sendMessage(t);
  input.value = "";
};
$("older-btn").onclick = async () => {
  const c = conv(state.open);
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  await loadOlder(c);
  renderMessages();
  box.scrollTop = box.scrollHeight - fromBottom; // keep the view where it was
};
$("messages").onscroll = () => {
  if ($("messages").scrollTop === 0 && !$("older-btn").hidden) $("older-btn").click();
};
document.addEventListener("visibilitychange", () => {
  if (state.open) markRead(conv(state.open));
});

(function resume() {
  const saved = sessionStorage.getItem("sai");
  if (!saved) return;
  try {
    const s = JSON.parse(saved);
    start(s.token, s.userId, s.username).catch(() => loggedOut(""));
  } catch {
    sessionStorage.removeItem("sai");
  }
})();
