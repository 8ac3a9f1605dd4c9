"""Chat messages to prompt token ids through the model's own chat template."""
from __future__ import annotations


def chat_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Renders `messages` with the tokenizer's chat template and tokenizes the result.

    Raises ValueError for a model without a template or malformed messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; send a plain prompt instead")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] needs a string 'role' and a string 'content'")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors from the template itself (e.g. an unsupported role order)
        raise ValueError(f"chat template rejected the messages: {e}") from e
    # The template already spells out its special tokens.
    return list(tokenizer(text, add_special_tokens=False).input_ids)
