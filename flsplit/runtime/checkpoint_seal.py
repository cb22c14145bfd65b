"""Digests that make every byte of a checkpoint's ``checkpoint.json`` tamper-evident.

``seal`` adds ``digests`` to the checkpoint's JSON object (plain JSON values)::

    "digests": {"parts": {label: sha256, ...}, "all": sha256 of "parts"}

with a part per top-level section (the whole section: nothing escapes it) and finer parts
that name what an edit changed: each key of a section, each history round, each entry of
the state's tensor map (the state's keys digested with their references blanked, so that a
changed reference names its entry alone). A part's digest is the SHA-256 of its value as
``json.dumps`` writes it (key order kept). ``find_tampering`` recomputes them and also asks
that the file be exactly ``json.dumps`` of what it holds, so spacing and the spelling of a
value are covered as well.

These are plain digests, not an HMAC: any edit or corruption is evident, but whoever edits
the file and reruns ``seal`` is not stopped (a key kept apart from the run directory would
be needed, and a checkpoint could no longer move between machines with only its files).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional

__all__ = ["DIGESTS", "find_tampering", "seal"]

DIGESTS = "digests"
IsReference = Callable[[Any], bool]


def _sha256(value: Any) -> str:
    """The SHA-256 of ``value`` (plain JSON values) as ``json.dumps`` writes it."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _blank_references(value: Any, path: str, is_reference: IsReference, refs: dict[str, Any]) -> Any:
    """``value`` with each reference's name blanked; the references go to ``refs`` by dotted path."""
    if is_reference(value):
        refs[path] = value
        return {kind: None for kind in value}  # the kind stays: "$tensor" -> "$record" is a change here too
    if isinstance(value, dict):
        return {k: _blank_references(v, f"{path}.{k}" if path else k, is_reference, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank_references(v, f"{path}[{i}]", is_reference, refs) for i, v in enumerate(value)]
    return value


def _parts(meta: dict, is_reference: IsReference) -> dict[str, str]:
    """Label -> digest for every top-level section of ``meta`` but the digests, and its finer parts."""
    parts = {}
    for section, value in meta.items():
        if section == DIGESTS:
            continue
        label = f"section {section!r}"
        parts[label] = _sha256(value)  # covers the section even where finer labels could collide
        if section == "state":
            refs: dict[str, Any] = {}
            value = _blank_references(value, "", is_reference, refs)
            parts.update({f"{label} (tensor map entry {p!r})": _sha256(r) for p, r in refs.items()})
        for key, item in value.items() if isinstance(value, dict) else ():
            if section == "history" and key == "rounds" and isinstance(item, list):
                parts.update({f"{label} (round {i})": _sha256(r) for i, r in enumerate(item, 1)})
            else:
                parts[f"{label} (key {key!r})"] = _sha256(item)
    return parts


def seal(meta: dict, is_reference: IsReference) -> dict:
    """``meta`` (plain JSON values) with its digests added under ``DIGESTS``.

    Parameters
    ----------
    meta : dict
        The checkpoint's JSON object, without digests.
    is_reference : callable
        Whether a value in the state is a reference into the tensor file (a tensor map entry).
    """
    parts = _parts(meta, is_reference)
    return {**meta, DIGESTS: {"parts": parts, "all": _sha256(parts)}}


def _finest(labels: list[str]) -> list[str]:
    """``labels`` less a whole section where a finer label of it names the change."""
    return [l for l in labels if not any(m.startswith(l + " (") for m in labels)]


def _told(recorded: dict, computed: dict, content: bool) -> str:
    """What differs between the ``recorded`` digests and those ``computed`` from the content,
    told as edits of the content (``content``) or else of the digests."""
    changed = _finest([l for l in computed if l in recorded and recorded[l] != computed[l]])
    gone = _finest([l for l in recorded if l not in computed])
    new = _finest([l for l in computed if l not in recorded])
    if content:
        told = [f"{l} was altered after it was written" for l in changed]
        told += [f"{l} was removed" for l in gone] + [f"{l} was added" for l in new]
    else:
        told = [f"the digest of {l} was altered" for l in changed]
        told += [f"a digest of {l}, a part it does not hold, was added" for l in gone]
        told += [f"the digest of {l} was removed" for l in new]
    return "; ".join(told)


def find_tampering(meta: dict, text: bytes, is_reference: IsReference) -> Optional[str]:
    """What changed in a sealed ``checkpoint.json`` (``meta``, parsed from ``text``) since it was
    written, or ``None`` if nothing did.

    Which of content and digests was edited is told by the digest over all parts: content edited
    alone still matches it through the recorded parts, digests edited alone through the computed.
    """
    digests = meta[DIGESTS]
    if (not isinstance(digests, dict) or set(digests) != {"parts", "all"} or not isinstance(digests["parts"], dict)
            or not isinstance(digests["all"], str)):
        return "its digests are not the 'parts' and 'all' flsplit writes (they were altered)"
    recorded, computed = digests["parts"], _parts(meta, is_reference)
    recorded_whole = _sha256(recorded) == digests["all"]
    if recorded != computed:
        if _sha256(computed) == digests["all"]:
            return f"{_told(recorded, computed, content=False)} (the content they cover is as written)"
        also = "" if recorded_whole else " (and its digests were altered too)"
        return _told(recorded, computed, content=True) + also
    if not recorded_whole:
        return "its digest over all parts ('all') was altered"
    written = json.dumps(meta).encode()
    if written != text:  # the same values in other text: spacing, or a number or string spelled otherwise
        at = next((i for i, (a, b) in enumerate(zip(written, text)) if a != b), min(len(written), len(text)))
        return f"its text was edited at byte {at} ({text[max(at - 20, 0):at + 20]!r}) where no value changed"
    return None
