"""Facts rendered for people: the text outputs say ``yes``, ``none`` and ``MBR boot code``, never a
Python repr (``True``, ``None``, ``{'mbr_boot_code': ...}``, a path with its backslashes doubled);
the JSON outputs keep the values themselves."""

from __future__ import annotations

from typing import Any

#: words written in capitals when a key is turned into words
_ACRONYMS = {"mbr", "gpt", "esp", "efi", "uefi", "bios", "uuid", "fs", "os", "id", "chs", "gib", "mib", "ip", "mac",
             "bcd", "nvme", "ebr", "lvm", "vhd", "l1", "l2", "kb"}


def key_words(key: str) -> str:
    """``mbr_boot_code`` -> ``MBR boot code``."""
    return " ".join(word.upper() if word in _ACRONYMS else word for word in key.split("_"))


def words(value: Any) -> str:
    """A value as a person reads it: yes/no, lists joined by commas, a mapping as its keys in words
    each followed by its value (nested ones in parentheses); strings as they are."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        shown = [f"{key_words(str(key))} {_nested(item)}" for key, item in value.items() if item is not None]
        return ", ".join(shown) or "none"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_nested(item) for item in value) or "none"
    return str(value)


def _nested(value: Any) -> str:
    text = words(value)
    return f"({text})" if isinstance(value, (dict, list, tuple)) and ", " in text else text


def facts_line(facts: dict[str, Any]) -> str:
    """``key: value; key: value`` for the facts that are set."""
    return "; ".join(f"{key_words(key)}: {words(value)}" for key, value in facts.items() if value is not None)
