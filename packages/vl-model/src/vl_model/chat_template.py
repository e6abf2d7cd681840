"""The chat template of :class:`vl_model.processing.VLProcessor`: ChatML with Qwen3's hybrid thinking.

Implements the prompt format of Qwen3-VL (Qwen3-VL technical report, arXiv 2511.21631, section 4;
REFERENCE.md section 1) with the thinking switch of Qwen3 (Qwen3 technical report, arXiv
2505.09388, section 4.3 "thinking mode fusion"):

- turns are ``<|im_start|>{role}\\n ... <|im_end|>\\n``; an image item in a content list becomes
  ``<|vision_start|><|image_pad|><|vision_end|>`` and a video item
  ``<|vision_start|><|video_pad|><|vision_end|>`` (the processor later expands the pads to the
  right counts and puts a timestamp before every temporal patch of a video);
- thinking is on by default. ``enable_thinking=False`` turns it off for good; otherwise the most
  recent ``/think`` or ``/nothink`` (also ``/no_think``) written in a user or system message wins.
  When thinking is off the generation prompt ends with an empty ``<think>\\n\\n</think>\\n\\n``
  block, which tells the model to answer directly;
- assistant turns after the last user message show their reasoning as ``<think>\\n...\\n</think>\\n\\n``
  (the final turn always gets the block, empty when it has no reasoning: the non-thinking form);
  earlier assistant turns drop their reasoning, as Qwen3 is trained;
- tools (``tools=[...]``), ``tool_calls`` and ``tool`` messages use Qwen's ``<tool_call>`` /
  ``<tool_response>`` format; ``add_vision_id=True`` numbers pictures and videos.

Assistant text sits inside ``{% generation %}`` blocks, so ``return_assistant_tokens_mask=True``
marks the tokens an SFT loss should train on.
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATE", "THINK_OFF_SWITCHES", "THINK_ON_SWITCH"]

THINK_ON_SWITCH = "/think"
"""Soft switch that turns thinking on from this message on (unless ``enable_thinking=False``)."""

THINK_OFF_SWITCHES = ("/nothink", "/no_think")
"""Soft switches that turn thinking off from this message on."""

CHAT_TEMPLATE = r"""
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is not none -%}
        {%- for item in content -%}
            {%- if item is string -%}
                {{- item -}}
            {%- elif item.type == 'text' or 'text' in item -%}
                {{- item.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(thinking=not (enable_thinking is defined and enable_thinking is false), last_query=-1, images=0, videos=0) -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}
        {%- set ns.last_query = loop.index0 -%}
    {%- endif -%}
    {%- if message.role in ['user', 'system'] and not (enable_thinking is defined and enable_thinking is false) -%}
        {%- set text = text_of(message.content) -%}
        {%- set on_at = text.rfind('/think') -%}
        {%- set off_at = [text.rfind('/nothink'), text.rfind('/no_think')] | max -%}
        {%- if on_at > off_at -%}
            {%- set ns.thinking = true -%}
        {%- elif off_at > on_at -%}
            {%- set ns.thinking = false -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if has_system -%}
        {{- text_of(messages[0].content) + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' -}}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' -}}
    {{- '\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
    {{- '<|im_start|>system\n' + text_of(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == 'system' -%}
        {%- if not loop.first -%}
            {{- '<|im_start|>system\n' + text_of(message.content) + '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message.role == 'user' -%}
        {{- '<|im_start|>user\n' -}}
        {%- if message.content is string -%}
            {{- message.content -}}
        {%- else -%}
            {%- for item in message.content -%}
                {%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}
                    {%- set ns.images = ns.images + 1 -%}
                    {%- if add_vision_id -%}
                        {{- 'Picture ' + ns.images | string + ': ' -}}
                    {%- endif -%}
                    {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
                {%- elif item.type == 'video' or 'video' in item -%}
                    {%- set ns.videos = ns.videos + 1 -%}
                    {%- if add_vision_id -%}
                        {{- 'Video ' + ns.videos | string + ': ' -}}
                    {%- endif -%}
                    {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
                {%- elif 'text' in item -%}
                    {{- item.text -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- set content = text_of(message.content) -%}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}
        {%- if '</think>' in content -%}
            {%- if not reasoning -%}
                {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
            {%- endif -%}
            {%- set content = content.split('</think>')[-1] -%}
        {%- endif -%}
        {%- set reasoning = reasoning.strip('\n') -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
            {{- '<think>\n' + reasoning + '\n</think>\n\n' + content.lstrip('\n') -}}
        {%- else -%}
            {{- content.lstrip('\n') -}}
        {%- endif -%}
        {%- if message.tool_calls is defined and message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- if content or not loop.first -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
                {{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + text_of(message.content) + '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if not ns.thinking -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
""".strip()
"""Jinja chat template (ChatML, Qwen3-VL media placeholders, Qwen3 thinking switches, tools)."""
