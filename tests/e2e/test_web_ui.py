"""The web chat page at ``/ui`` in a real browser (Debian's chromium, driven by
Playwright) against the real core and gateway: streaming, the session kept
across reloads, Delete, errors, the settings sent with each message, markdown
rendered safely, the list of conversations, and the speed of each reply."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Request, Route, expect, sync_playwright

from tests.e2e.conftest import Service

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download is not used
WAIT_MS = 60_000  # a reply on a busy 2-core machine, with room to spare
SESSION_KEY = "llamachat.sessionId"  # where the page keeps the session id

# Records, on every change of the conversation while a reply streams, the
# length of the reply's markdown so far and whether Send is disabled.
OBSERVE_STREAMING = """() => {
  window.observed = [];
  const messages = document.getElementById("messages");
  new MutationObserver(() => {
    const reply = messages.querySelector(".msg.assistant.streaming");
    if (reply) window.observed.push({
      length: reply.source.length,
      sendDisabled: document.getElementById("send").disabled,
    });
  }).observe(messages, {childList: true, subtree: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    """The chat page in a fresh browser context: no stored session or key."""
    context = browser.new_context(base_url=service.url)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto("/ui")
    yield page
    context.close()


def set_controls(page: Page, temperature: str = "0", max_tokens: str = "24") -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def send(page: Page, message: str, *, press_enter: bool = False) -> None:
    page.fill("#message", message)
    if press_enter:
        page.press("#message", "Enter")
    else:
        page.click("#send")


def wait_for_reply(page: Page, count: int) -> str:
    """Wait until the page shows ``count`` replies, none still streaming; the
    markdown of the last, whose stream ended with its ``done`` event."""
    replies = page.locator(".msg.assistant")
    expect(replies).to_have_count(count, timeout=WAIT_MS)
    expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    expect(replies.last).to_have_attribute("data-finish-reason", re.compile("^(stop|length)$"))
    return str(replies.last.evaluate("el => el.source"))


def session_shown(page: Page) -> str:
    return page.text_content("#session") or ""


def sent_json(request: Request) -> dict[str, Any]:
    """The JSON body the page sent."""
    body = request.post_data_json
    assert isinstance(body, dict), body
    return body


def texts(page: Page) -> list[str]:
    """The messages as shown (rendered)."""
    return page.locator("#messages .msg .content").all_text_contents()


def sources(page: Page) -> list[str]:
    """The messages' markdown, as sent and received."""
    return list(page.locator("#messages .msg").evaluate_all("els => els.map(e => e.source)"))


def stored_session(service: Service, session_id: str) -> httpx.Response:
    return httpx.get(f"{service.url}/sessions/{session_id}", timeout=10)


def test_reply_streams_and_session_survives_reload(page: Page, service: Service):
    first, second = "Tell me a story about a dragon.", "What color was the dragon?"
    set_controls(page, max_tokens="40")
    page.evaluate(OBSERVE_STREAMING)
    send(page, first, press_enter=True)
    reply = wait_for_reply(page, 1)

    # Tokens arrived one after another while Send stayed disabled.
    observed = page.evaluate("window.observed")
    lengths = [o["length"] for o in observed if o["length"] > 0]
    assert len(set(lengths)) >= 2, observed
    assert lengths == sorted(lengths) and lengths[-1] <= len(reply)
    assert all(o["sendDisabled"] for o in observed)
    session_id = session_shown(page)
    assert session_id and reply
    assert stored_session(service, session_id).json()["exchanges"] == [
        {"user": first, "assistant": reply}
    ]

    shown = texts(page)
    page.reload()
    expect(page.locator("#messages .msg")).to_have_count(2, timeout=WAIT_MS)
    assert sources(page) == [first, reply]
    assert texts(page) == shown  # rendered from the stored history as when it streamed
    expect(page.locator("#session")).to_have_text(session_id)

    with page.expect_request("**/chat/stream") as request:
        send(page, second)
    assert sent_json(request.value)["session_id"] == session_id
    second_reply = wait_for_reply(page, 2)
    assert sources(page) == [first, reply, second, second_reply]
    exchanges = stored_session(service, session_id).json()["exchanges"]
    assert [e["user"] for e in exchanges] == [first, second]
    assert exchanges[1]["assistant"] == second_reply
    expect(page.locator("#session")).to_have_text(session_id)


def test_delete_empties_the_view_and_forgets_the_session(page: Page, service: Service):
    set_controls(page, max_tokens="8")
    send(page, "Hello!")
    wait_for_reply(page, 1)
    session_id = session_shown(page)
    assert session_id in httpx.get(f"{service.url}/sessions").json()["sessions"]

    page.click("#clear")
    expect(page.locator("#messages > *")).to_have_count(0)
    expect(page.locator("#session")).to_have_text("")
    assert stored_session(service, session_id).status_code == 404
    assert session_id not in httpx.get(f"{service.url}/sessions").json()["sessions"]
    assert page.evaluate(f"localStorage.getItem({SESSION_KEY!r})") is None
    expect(page.locator("#error")).to_be_hidden()

    page.reload()
    set_controls(page, max_tokens="8")
    with page.expect_request("**/chat/stream") as request:
        send(page, "Hello again!")
    assert "session_id" not in sent_json(request.value)
    wait_for_reply(page, 1)
    assert texts(page)[0] == "Hello again!"
    assert session_shown(page) not in ("", session_id)


@pytest.mark.parametrize("stop_with", ["the Stop button", "the Escape key"])
def test_stop_ends_a_streaming_reply(page: Page, stop_with: str):
    set_controls(page, max_tokens="400")
    send(page, "Write a long essay about the sea.")
    reply = page.locator(".msg.assistant.streaming")
    expect(reply).not_to_have_text("", timeout=WAIT_MS)  # the first tokens are in
    if stop_with == "the Stop button":
        page.click("#stop")
    else:
        page.keyboard.press("Escape")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_hidden()
    stopped = page.locator(".msg.assistant")
    expect(stopped.locator(".meta")).to_have_text(re.compile("stopped"))
    expect(stopped).not_to_have_attribute("data-finish-reason", re.compile(".*"))
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#session")).to_have_text("")  # a stopped turn is not kept


def test_api_error_detail_is_shown(page: Page, service: Service):
    message = "Hi"
    set_controls(page, max_tokens="0")
    send(page, message)

    answer = httpx.post(
        f"{service.url}/chat/stream",
        json={"message": message, "temperature": 0, "max_tokens": 0},
        timeout=10,
    )
    assert answer.status_code == 400
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_contain_text(answer.json()["detail"])
    expect(error).to_contain_text("400")
    expect(page.locator(".msg.assistant")).to_have_count(0)
    expect(page.locator(".msg.user.failed")).to_have_text(message)
    expect(page.locator("#message")).to_have_value(message)  # kept, to send again
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#session")).to_have_text("")

    page.fill("#max-tokens", "4")
    page.click("#send")
    assert wait_for_reply(page, 1)
    expect(error).to_be_hidden()


def test_stream_error_event_is_shown_and_tokens_stay_text(page: Page):
    markup = '<img src=x onerror="window.injected = true">'
    events = [{"token": "Hi "}, {"token": markup}, {"error": "Generation error: out of luck"}]
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events)

    def scripted_stream(route: Route) -> None:
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    page.route("**/chat/stream", scripted_stream)
    send(page, "Hello")
    expect(page.locator("#error")).to_contain_text("Generation error: out of luck")
    reply = page.locator(".msg.assistant .content")
    expect(reply).to_have_text("Hi " + markup)
    expect(page.locator("#messages img")).to_have_count(0)
    assert page.evaluate("window.injected") is None
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#session")).to_have_text("")


def test_network_error_is_shown(page: Page):
    page.route("**/chat/stream", lambda route: route.abort("connectionrefused"))
    send(page, "Hello")
    expect(page.locator("#error")).to_contain_text("Network error")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator(".msg.assistant")).to_have_count(0)


def test_settings_and_api_key_are_sent(page: Page, service: Service):
    message = "Count to ten."
    set_controls(page, temperature="0", max_tokens="1")
    page.fill("#api-key", "secret-key")
    with page.expect_request("**/chat/stream") as request:
        send(page, message)
    assert sent_json(request.value) == {"message": message, "temperature": 0, "max_tokens": 1}
    assert request.value.headers["authorization"] == "Bearer secret-key"

    reply = page.locator(".msg.assistant")
    expect(reply).to_have_attribute("data-finish-reason", "length", timeout=WAIT_MS)
    expect(reply).to_have_attribute("data-tokens-used", "1")
    session_id = session_shown(page)
    assert session_id
    stored = stored_session(service, session_id).json()["exchanges"]
    assert stored == [{"user": message, "assistant": reply.evaluate("el => el.source")}]

    # The key is kept, and the history is fetched with it after a reload.
    with page.expect_request(f"**/sessions/{session_id}") as restore:
        page.reload()
    assert restore.value.headers["authorization"] == "Bearer secret-key"
    expect(page.locator("#api-key")).to_have_value("secret-key")


# Renders crafted markdown with the page's own renderer, puts it into the page
# and, once the browser has tried every image in it, describes what was built:
# its elements, their attributes and its text.
RENDER_IN_PAGE = """async (markdown) => {
  const box = document.createElement("div");
  box.append(renderMarkdown(markdown));
  document.body.append(box);
  await new Promise((resolve) => setTimeout(resolve, 200));
  const elements = [...box.querySelectorAll("*")];
  return {
    tags: elements.map((e) => e.tagName.toLowerCase()),
    attributes: elements.flatMap((e) => [...e.attributes].map((a) => [a.name, a.value])),
    text: box.textContent,
  };
}"""

# Markup that runs script if it is ever taken as HTML (or as a URL).
HOSTILE = [
    "<script>window.injected = 'script'</script>",
    "<img src=x onerror=\"window.injected = 'img'\">",
    "<svg onload=\"window.injected = 'svg'\"></svg>",
    "<iframe src=\"javascript:window.injected = 'iframe'\"></iframe>",
    "[a link](javascript:window.injected='link')",
    '![an image](x "t") <a href="javascript:window.injected=\'a\'">a</a>',
]


def test_code_block_has_a_copy_button_and_the_reply_its_speed(page: Page):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    set_controls(page, max_tokens="40")
    send(page, "Show a Python hello world program in a code block.")
    reply = wait_for_reply(page, 1)
    assert "```" in reply, reply  # the model's greedy reply has a fenced block

    block = page.locator(".msg.assistant .code").first
    code = block.locator("pre code").text_content() or ""
    assert code.strip() and code.strip() in reply  # the block's text, not its markdown
    copy = block.get_by_role("button", name="Copy code")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == code

    # Token count and decode speed under the reply.
    shown = page.locator(".msg.assistant")
    tokens = shown.get_attribute("data-tokens-used")
    speed = shown.get_attribute("data-tokens-per-second")
    assert tokens and int(tokens) > 1 and speed and float(speed) > 0
    expect(shown.locator(".meta")).to_have_text(
        re.compile(
            rf"^{tokens} tokens · {re.escape(speed)} tokens/s · first token \d+\.\d+ s · stop$"
        )
    )


def test_markup_in_messages_is_text_and_never_runs(page: Page):
    # The user's own message goes through the same renderer as replies, and
    # into the stored history that is rendered again after a reload.
    message = "Repeat: " + " ".join(HOSTILE[:2])
    set_controls(page, max_tokens="4")
    send(page, message)
    wait_for_reply(page, 1)
    for _ in range(2):
        expect(page.locator(".msg.user .content")).to_have_text(message)
        expect(page.locator("#messages script, #messages img")).to_have_count(0)
        assert page.evaluate("window.injected") is None
        page.reload()
        expect(page.locator(".msg.assistant")).to_have_count(1)

    # Crafted markdown through the page's renderer: markdown still renders,
    # and nothing that could run survives.
    built = page.evaluate(RENDER_IN_PAGE, "\n\n".join([*HOSTILE, "**bold** and `code`"]))
    assert {"p", "a", "strong", "code"} <= set(built["tags"])
    assert not {"script", "img", "svg", "iframe"} & set(built["tags"]), built
    for name, value in built["attributes"]:
        assert not name.startswith("on") and "javascript:" not in value, built
    for markup in HOSTILE[:4]:
        assert markup in built["text"]  # shown as text, as written
    assert page.evaluate("window.injected") is None

    # Even markup that skipped the sanitizer cannot run: the page's policy
    # allows no inline script.
    blocked = page.evaluate("""() => new Promise((resolve) => {
      let violated = "";
      document.addEventListener("securitypolicyviolation",
                                (e) => { violated = e.effectiveDirective; }, {once: true});
      const box = document.createElement("div");
      box.innerHTML = '<img src="data:," onerror="window.injected = 1">';
      box.firstChild.addEventListener("error", () => setTimeout(() => resolve(violated), 100));
      document.body.append(box);
    })""")
    assert blocked.startswith("script-src")
    assert page.evaluate("window.injected") is None


def test_conversations_are_listed_switched_continued_and_deleted(page: Page, service: Service):
    set_controls(page, max_tokens="8")
    first, second = "My name is Alice.", "What is the capital of France?"
    page.fill("#message", "Line one")
    page.press("#message", "Shift+Enter")  # a new line, not a message
    page.keyboard.type("two")
    expect(page.locator("#message")).to_have_value("Line one\ntwo")
    expect(page.locator("#messages .msg")).to_have_count(0)
    send(page, first)
    first_reply = wait_for_reply(page, 1)
    first_id = session_shown(page)
    page.click("#new-chat")
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#session")).to_have_text("")
    expect(page.locator("#message")).to_be_focused()
    send(page, second)
    second_reply = wait_for_reply(page, 1)
    second_id = session_shown(page)
    assert first_id and second_id and first_id != second_id

    def item(session_id: str) -> Locator:
        return page.locator(f'#conversations li[data-session-id="{session_id}"]')

    def listed() -> list[str]:
        return list(
            page.locator("#conversations li").evaluate_all(
                "items => items.map(i => i.dataset.sessionId)"
            )
        )

    # Both are listed, the most recently used first, titled by their first message.
    expect(item(first_id).locator(".open")).to_have_text(first)
    expect(item(second_id).locator(".open")).to_have_text(second)
    expect(item(second_id).locator(".open")).to_have_attribute("aria-current", "true")
    assert listed().index(second_id) < listed().index(first_id)

    # Open the first: its history; continue it.
    item(first_id).locator(".open").click()
    expect(page.locator("#session")).to_have_text(first_id)
    expect(page.locator("#messages .msg")).to_have_count(2)
    assert sources(page) == [first, first_reply]
    expect(page.locator("#message")).to_be_focused()
    with page.expect_request("**/chat/stream") as request:
        send(page, "What is my name?", press_enter=True)
    assert sent_json(request.value)["session_id"] == first_id
    wait_for_reply(page, 2)
    exchanges = stored_session(service, first_id).json()["exchanges"]
    assert [e["user"] for e in exchanges] == [first, "What is my name?"]
    expect(page.locator("#conversations li").first).to_have_attribute("data-session-id", first_id)

    # Back to the second, by keyboard.
    item(second_id).locator(".open").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#session")).to_have_text(second_id)
    expect(page.locator("#messages .msg")).to_have_count(2)
    assert sources(page) == [second, second_reply]

    # Delete the first (not the open one) from the keyboard: Tab reaches its button.
    item(first_id).locator(".open").focus()
    page.keyboard.press("Tab")
    delete = item(first_id).locator(".delete")
    expect(delete).to_be_focused()
    expect(delete).to_have_attribute("aria-label", f"Delete conversation: {first}")
    page.keyboard.press("Enter")
    expect(item(first_id)).to_have_count(0)
    assert stored_session(service, first_id).status_code == 404
    expect(page.locator("#session")).to_have_text(second_id)  # the open one stays
    expect(page.locator("#messages .msg")).to_have_count(2)
    expect(page.locator("#conversations button:focus")).to_have_count(1)  # focus kept in the list

    # Delete the open one: the view empties for a new conversation.
    item(second_id).locator(".delete").click()
    expect(item(second_id)).to_have_count(0)
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#session")).to_have_text("")
    assert stored_session(service, second_id).status_code == 404
    assert page.evaluate(f"localStorage.getItem({SESSION_KEY!r})") is None
