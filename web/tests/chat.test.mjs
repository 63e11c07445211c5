// The web client in headless Chromium against a real sai-im: three users in three browser
// contexts go through the whole story (register, friends, private chat with acks and read
// receipts, history paging, a network drop and reconnect, groups with "read by N", and an
// exclusive login). Run by scripts/browser-test.sh:
//   SAI_IM_BIN=target/debug/sai-im node web/tests/chat.test.mjs
// SAI_SCREENSHOTS=<dir> also saves the screenshots shown in the README.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

const BIN = process.env.SAI_IM_BIN || "target/debug/sai-im";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SAI_SCREENSHOTS;
const WAIT = 15_000;

// ------------------------------------------------------------------ the server

function startServer(dataDir) {
  const child = spawn(
    BIN,
    ["--data-dir", dataDir, "--ws-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0", "--shards", "1", "--bcrypt-cost", "4"],
    { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, RUST_LOG: "warn" } },
  );
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: child.stdout });
    const timer = setTimeout(() => reject(new Error("sai-im printed no ready line")), 60_000);
    child.on("exit", (code) => reject(new Error(`sai-im exited with ${code} before it was ready`)));
    lines.once("line", (line) => {
      clearTimeout(timer);
      const field = (k) => line.split(" ").find((w) => w.startsWith(k + "="))?.slice(k.length + 1);
      if (!line.startsWith("sai-im ready")) return reject(new Error(line));
      resolve({ child, http: field("http"), ws: field("ws") });
    });
  });
}

// A TCP relay in front of the gateway: `cut()` drops every connection through it and refuses
// new ones until `restore()`: a network drop as the browser sees it.
function relay(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
  const open = new Set();
  let cut = false;
  const server = net.createServer((inbound) => {
    if (cut) return inbound.destroy();
    const outbound = net.connect(port, host);
    open.add(inbound).add(outbound);
    const drop = () => {
      inbound.destroy();
      outbound.destroy();
      open.delete(inbound);
      open.delete(outbound);
    };
    inbound.on("error", drop).on("close", drop);
    outbound.on("error", drop).on("close", drop);
    inbound.pipe(outbound).pipe(inbound);
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        port: server.address().port,
        cut() {
          cut = true;
          for (const s of open) s.destroy();
          open.clear();
        },
        restore() {
          cut = false;
        },
        close: () => server.close(),
      }),
    ),
  );
}

// ------------------------------------------------------------------ helpers

const errors = [];

async function page(browser, url) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const p = await context.newPage();
  p.on("pageerror", (e) => errors.push(`${url}: ${e.stack}`));
  await p.goto(url);
  return p;
}

async function signIn(p, username, register) {
  await p.fill("#auth-username", username);
  await p.fill("#auth-password", "correct horse " + username);
  await p.click(register ? "#register-btn" : "#login-btn");
  await online(p);
}

const online = (p) => p.waitForSelector("body[data-online=yes]", { timeout: WAIT });
const offline = (p) => p.waitForSelector("body[data-online=no]", { timeout: WAIT });

async function until(p, fn, arg, what) {
  try {
    await p.waitForFunction(fn, arg, { timeout: WAIT });
  } catch (e) {
    throw new Error(`waiting for ${what}: ${e.message.split("\n")[0]}`);
  }
}

async function send(p, text) {
  await p.fill("#composer-text", text);
  await p.press("#composer-text", "Enter");
}

// The open conversation's messages as rendered: [{seq, text, status, from, reads}].
const messages = (p) =>
  p.$$eval("#message-list li", (lis) =>
    lis.map((li) => ({
      seq: li.dataset.seq === undefined ? null : Number(li.dataset.seq),
      text: li.querySelector(".body").textContent,
      status: li.querySelector(".status")?.textContent.replace(" · ", "") ?? null,
      from: li.querySelector(".from")?.textContent ?? null,
      reads: li.querySelector(".reads")?.textContent ?? null,
    })),
  );

// Waits until the message `text` is shown with `status` (or, for a group message, `reads`).
function messageShown(p, text, status) {
  return until(
    p,
    ([t, s]) =>
      [...document.querySelectorAll("#message-list li")].some(
        (li) =>
          li.querySelector(".body").textContent === t &&
          (s === null || (li.querySelector(".status, .reads")?.textContent ?? "").replace(" · ", "") === s),
      ),
    [text, status],
    `"${text}"${status ? " " + status : ""}`,
  );
}

function convItem(p, title) {
  return p.locator("#conversations li", { has: p.locator(".conv-name", { hasText: new RegExp(`^${title}$`) }) });
}

async function shot(p, name) {
  if (SHOTS) await p.screenshot({ path: path.join(SHOTS, name + ".png") });
}

function step(name) {
  console.log(`- ${name}`);
}

// Every message seq of the open conversation is shown once, in order, without a gap.
function assertOnceInOrder(list, what) {
  const seqs = list.filter((m) => m.seq !== null).map((m) => m.seq);
  const first = seqs[0];
  assert.deepEqual(seqs, seqs.map((_, i) => first + i), `${what}: seqs in order, no gap and no duplicate`);
  const texts = list.map((m) => m.text);
  assert.equal(new Set(texts).size, texts.length, `${what}: each text once`);
}

// ------------------------------------------------------------------ the story

const dataDir = mkdtempSync(path.join(os.tmpdir(), "sai-web-"));
if (SHOTS) mkdirSync(SHOTS, { recursive: true });
const server = await startServer(dataDir);
const proxy = await relay(server.ws);
const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
const home = `http://${server.http}/`;
let failed = false;

try {
  step("the page is served by sai-im itself");
  const alice = await page(browser, home);
  await shot(alice, "login");
  await signIn(alice, "alice", true);
  // Bob's WebSocket goes through the relay, so that the test can cut his network.
  const bob = await page(browser, `${home}?ws=ws://127.0.0.1:${proxy.port}/ws`);
  await signIn(bob, "bob", true);
  const carol = await page(browser, home);
  await signIn(carol, "carol", true);

  step("a taken username is refused with the server's message");
  const again = await page(browser, home);
  await again.fill("#auth-username", "alice");
  await again.fill("#auth-password", "another password");
  await again.click("#register-btn");
  await until(again, () => document.querySelector("#auth-error").textContent.length > 0, null, "the error");
  assert.match(await again.textContent("#auth-error"), /taken|exists/i);
  await again.context().close();

  step("friend requests: sent by name, arrive live, accepted and rejected");
  await alice.fill("#friend-username", "bob");
  await alice.press("#friend-username", "Enter");
  await until(alice, () => /Request sent/.test(document.querySelector("#friend-status").textContent), null, "request sent");
  await bob.locator("#requests li", { hasText: "alice" }).waitFor({ timeout: WAIT });
  await bob.locator("#requests li", { hasText: "alice" }).getByText("Accept").click();
  await alice.locator("#friends li", { hasText: "bob" }).waitFor({ timeout: WAIT });
  await bob.locator("#friends li", { hasText: "alice" }).waitFor({ timeout: WAIT });

  await carol.fill("#friend-username", "alice");
  await carol.press("#friend-username", "Enter");
  await alice.locator("#requests li", { hasText: "carol" }).waitFor({ timeout: WAIT });
  await alice.locator("#requests li", { hasText: "carol" }).getByText("Reject").click();
  await until(alice, () => document.querySelector("#requests-box").hidden, null, "the request gone");
  assert.equal(await alice.locator("#friends li", { hasText: "carol" }).count(), 0, "a rejected request makes no friend");
  await alice.fill("#friend-username", "nobody-here");
  await alice.press("#friend-username", "Enter");
  await until(alice, () => /No user named/.test(document.querySelector("#friend-status").textContent), null, "no such user");
  await alice.fill("#friend-username", "carol");
  await alice.press("#friend-username", "Enter");
  await carol.locator("#requests li", { hasText: "alice" }).getByText("Accept").click();
  await alice.locator("#friends li", { hasText: "carol" }).waitFor({ timeout: WAIT });

  step("private chat: acked, unread on the other side live, then read live");
  await alice.locator("#friends li", { hasText: "bob" }).click();
  await send(alice, "hello bob");
  await messageShown(alice, "hello bob", "sent");
  await convItem(bob, "alice").locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
  assert.equal(await convItem(bob, "alice").locator(".conv-last").textContent(), "hello bob");
  await shot(bob, "conversations");
  await convItem(bob, "alice").click();
  await messageShown(bob, "hello bob", null);
  await messageShown(alice, "hello bob", "read");
  assert.equal(await convItem(bob, "alice").locator(".badge").textContent(), "", "opened: no unread");
  await send(bob, "hi alice");
  await messageShown(alice, "hi alice", null);
  await messageShown(bob, "hi alice", "read"); // alice has the conversation open

  step("history pages upward");
  for (let i = 1; i <= 40; i++) await send(alice, `history ${i}`);
  await messageShown(alice, "history 40", "read");
  await bob.reload(); // the session is kept; the conversation is loaded again from the server
  await online(bob);
  await convItem(bob, "alice").click();
  await messageShown(bob, "history 40", null);
  let shown = await messages(bob);
  assert.equal(shown.length, 30, "one page");
  assert.equal(shown[0].seq, 13);
  await bob.click("#older-btn");
  await until(bob, () => document.querySelectorAll("#message-list li").length === 42, null, "all 42 messages");
  shown = await messages(bob);
  assert.equal(shown[0].text, "hello bob");
  assert.ok(await bob.locator("#older-btn").isHidden(), "nothing older");
  assertOnceInOrder(shown, "bob after paging");

  step("a network drop: offline, then reconnected and synced without duplicates");
  proxy.cut();
  await offline(bob);
  await until(bob, () => /reconnecting/.test(document.querySelector("#banner").textContent), null, "the banner");
  await send(bob, "written offline");
  await messageShown(bob, "written offline", "pending");
  await shot(bob, "reconnecting");
  for (let i = 1; i <= 3; i++) await send(alice, `while you were away ${i}`);
  await messageShown(alice, "while you were away 3", "sent");
  proxy.restore();
  await online(bob);
  await messageShown(bob, "while you were away 3", null);
  await messageShown(bob, "written offline", "read");
  await messageShown(alice, "written offline", null);
  await messageShown(alice, "while you were away 3", "read");
  assertOnceInOrder(await messages(bob), "bob after the drop");
  assertOnceInOrder(await messages(alice), "alice after the drop");
  assert.equal((await messages(bob)).length, 46);
  assert.equal((await messages(alice)).length, 46);
  await shot(alice, "private-chat");

  step("groups: created, a member added, chat, read by N with who read");
  await alice.click("#new-group summary");
  await alice.fill("#group-name", "team");
  await alice.locator("#group-friends label", { hasText: "bob" }).locator("input").check();
  await alice.click("#group-form button[type=submit]");
  await until(alice, () => document.querySelector("#chat-title").textContent === "team", null, "the group open");
  await alice.selectOption("#add-member-select", { label: "carol" });
  await alice.click("#add-member-form button");
  await until(alice, () => ![...document.querySelectorAll("#add-member-select option")].some((o) => o.textContent === "carol"), null, "carol added");
  await send(alice, "hello team");
  await messageShown(alice, "hello team", "read by 0");
  await convItem(bob, "team").locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
  await convItem(carol, "team").locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
  await convItem(bob, "team").click();
  await messageShown(alice, "hello team", "read by 1");
  await alice.locator("#message-list .reads", { hasText: "read by 1" }).click();
  await until(alice, () => /Read by 1: bob/.test(document.querySelector("#readers").textContent), null, "bob among the readers");
  await convItem(carol, "team").click();
  await messageShown(alice, "hello team", "read by 2");
  await send(carol, "carol here");
  await until(bob, () => [...document.querySelectorAll("#message-list li")].some((li) => li.querySelector(".from")?.textContent === "carol" && li.querySelector(".body").textContent === "carol here"), null, "carol's message with her name");
  await messageShown(alice, "carol here", null);
  await alice.locator("#message-list .reads", { hasText: "read by 2" }).click();
  await until(alice, () => /Read by 2: (bob, carol|carol, bob)/.test(document.querySelector("#readers").textContent), null, "both readers");
  await shot(alice, "group");

  step("exclusive login: the older window is told, the newer one gets the messages");
  const bob2 = await page(browser, home);
  await signIn(bob2, "bob", false);
  await until(bob, () => /signed in somewhere else/.test(document.querySelector("#banner").textContent), null, "the notice");
  await shot(bob, "replaced");
  await send(carol, "to the new window");
  await convItem(bob2, "team").locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
  await bob.waitForTimeout(300);
  assert.ok(!(await bob.locator("#message-list li", { hasText: "to the new window" }).count()), "the replaced window stays disconnected");

  assert.deepEqual(errors, [], "no script error in any page");
  console.log("ok: the web client's story passed");
} catch (e) {
  failed = true;
  console.error("FAILED:", e);
} finally {
  await browser.close();
  proxy.close();
  server.child.kill("SIGTERM");
  await new Promise((r) => server.child.once("exit", r));
  rmSync(dataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
