"""Drives ragd's chat page in headless Chromium over the DevTools protocol.

Usage: check.py BASE_URL [CHROMIUM]. Opens BASE_URL/, asks a question, and
checks that the answer streams in (the answer box changes several times before
the page says it is done), that numbered sources appear, and that a source's
text opens. Exits non-zero with the reason otherwise.
"""
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket  # websocket-client

base = sys.argv[1]
chromium = sys.argv[2] if len(sys.argv) > 2 else (shutil.which("chromium") or "chromium")
profile = tempfile.mkdtemp(prefix="ragd-chromium-")
proc = subprocess.Popen(
    [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
     "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*", "--user-data-dir=" + profile, "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    port = None
    deadline = time.time() + 60
    while port is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("chromium exited before it listened")
        m = re.search(r"DevTools listening on ws://[^:/]+:(\d+)/", line)
        if m:
            port = int(m.group(1))
    if port is None:
        raise SystemExit("chromium did not start its DevTools endpoint")
    targets = json.load(urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port))
    page = next(t for t in targets if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
    next_id = [0]

    def call(method, **params):
        next_id[0] += 1
        ws.send(json.dumps({"id": next_id[0], "method": method, "params": params}))
        while True:
            reply = json.loads(ws.recv())
            if reply.get("id") == next_id[0]:
                if "error" in reply:
                    raise SystemExit("%s: %s" % (method, reply["error"]))
                return reply.get("result", {})

    def js(expression):
        r = call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise SystemExit("page script failed: %s" % r["exceptionDetails"])
        return r["result"].get("value")

    def wait_for(expression, seconds, what):
        deadline = time.time() + seconds
        while time.time() < deadline:
            value = js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise SystemExit("timed out waiting for " + what)

    call("Page.enable")
    call("Page.navigate", url=base + "/")
    wait_for('document.readyState === "complete" && !!document.getElementById("question")', 30, "the page")
    # Count the answer box's changes while the page is still answering.
    js('''window.__partial = 0;
          new MutationObserver(() => {
            if (document.body.dataset.state === "asking" && document.getElementById("answer").textContent)
              window.__partial++;
          }).observe(document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
          document.getElementById("question").value = "How long does an adult cat sleep each day?";
          document.getElementById("ask").click(); true''')
    state = wait_for('["done", "error"].includes(document.body.dataset.state) && document.body.dataset.state', 180, "the answer")
    answer = js('document.getElementById("answer").textContent')
    if state != "done":
        raise SystemExit("the page shows an error: " + answer)
    partial = js("window.__partial")
    sources = js('Array.from(document.querySelectorAll("#sources li")).map(li => li.dataset.document)')
    if not answer.strip():
        raise SystemExit("empty answer")
    if partial < 2:
        raise SystemExit("the answer did not stream in (%d partial updates)" % partial)
    if "cats" not in sources:
        raise SystemExit("sources: %s" % sources)
    # Open the first source's text.
    js('(() => { const li = [...document.querySelectorAll("#sources li")].find(l => l.dataset.document === "cats"); li.querySelector("details").open = true; return true; })()')
    text = wait_for('(() => { const li = [...document.querySelectorAll("#sources li")].find(l => l.dataset.document === "cats"); return li.querySelector(".text").textContent; })()', 30, "the source text")
    if "purr" not in text:
        raise SystemExit("source text: " + text)
    status = js('document.getElementById("status").textContent')
    # A Chinese question gets the page's words in Chinese.
    js('''document.body.dataset.state = "";
          document.getElementById("question").value = "猫每天睡多少个小时？";
          document.getElementById("ask").click(); true''')
    wait_for('["done", "error"].includes(document.body.dataset.state)', 180, "the Chinese answer")
    zh_status = js('document.getElementById("status").textContent')
    if not any("\u4e00" <= c <= "\u9fff" for c in zh_status):
        raise SystemExit("the status of a Chinese question is not in Chinese: %r" % zh_status)
    print(json.dumps({"answer": answer, "partial_updates": partial, "sources": sources,
                      "status": status, "zh_status": zh_status}, ensure_ascii=False))
finally:
    proc.kill()
    shutil.rmtree(profile, ignore_errors=True)
