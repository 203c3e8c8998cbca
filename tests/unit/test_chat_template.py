"""A GGUF file's chat template is rendered in Jinja2's sandbox: a template that
reaches for Python's internals fails instead of running code."""

from __future__ import annotations

import jinja2.sandbox
import pytest
from jinja2.exceptions import SecurityError
from llama_cpp.llama_types import ChatCompletionRequestMessage

from inference_server.llama_runtime import CHATML_TEMPLATE, chat_formatter

MESSAGES: list[ChatCompletionRequestMessage] = [{"role": "user", "content": "hi"}]


def render(template: str) -> str:
    return chat_formatter(template, eos_token="</s>", bos_token="<s>")(messages=MESSAGES).prompt


def test_the_fallback_template_renders_chatml():
    assert render(CHATML_TEMPLATE) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
    ],
)
def test_a_template_reaching_for_python_internals_is_refused(template):
    with pytest.raises(SecurityError):
        render(template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages | attr('__class__') }}",  # CVE-2025-27516, fixed in Jinja2 3.1.6
        "{% for m in messages %}{{ m.content.format.__globals__ }}{% endfor %}",
        "{{ messages[0].content.format_map.__self__ }}",
    ],
)
def test_indirect_routes_to_python_internals_render_nothing(template):
    assert render(template) == ""


def test_the_renderer_is_jinja2s_immutable_sandbox():
    formatter = chat_formatter(CHATML_TEMPLATE, eos_token="", bos_token="")
    environment = formatter._environment.environment  # llama-cpp-python==0.3.36
    assert isinstance(environment, jinja2.sandbox.ImmutableSandboxedEnvironment)
