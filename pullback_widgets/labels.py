"""Class names to class indices, forgiving of case and helpful about typos."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from .validation import PullbackWidgetsError, PullbackWidgetsTypeError, close_matches, is_integer

IMAGENET_ASSUMED = "assuming ImageNet-1k class names; pass labels= to change"


def class_names(num_classes: int, labels: Sequence[str] | None = None,
                model: object = None) -> tuple[list[str], str | None]:
    """(a name per class, a note or None) for a model with ``num_classes`` outputs.

    ``labels`` given always win, and must name every class; else the model's own ``labels``
    attribute (as :func:`~pullback_widgets.load_model` sets it); else, for 1000 classes, the
    ImageNet-1k names, with the note :data:`IMAGENET_ASSUMED` for the status line; else
    "class 0", "class 1", ...
    """
    what = "labels"
    if labels is None:
        labels = getattr(model, "labels", None)
        what = "model.labels"  # the caller passed none: say whose they are
    if labels is not None:
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise PullbackWidgetsTypeError(
                f"{what} must be a list of class names, got {type(labels).__name__}"
                + ("" if what == "labels" else "; pass labels= to name the classes"))
        if len(labels) != num_classes:
            raise PullbackWidgetsError(f"{what} names {len(labels)} classes but the model "
                                       f"has {num_classes} outputs")
        return [str(label) for label in labels], None
    if num_classes == 1000:
        from .models import imagenet_labels

        return imagenet_labels(), IMAGENET_ASSUMED
    return [f"class {i}" for i in range(num_classes)], None


def find_class(query: int | str, labels: Sequence[str]) -> int:
    """The class index that ``query`` names: an index, a digit string, a class name, or
    "name (index)" as the explorers list them.

    Names match ignoring case, surrounding whitespace (labels read with ``readlines()`` keep
    their newlines) and Unicode normal form; any integer type is an index (numpy's too). A name
    that matches no class, or several (ImageNet's "cardigan", the dog and the sweater), raises
    a PullbackWidgetsError (a ValueError) that lists close matches with their indices.
    """
    if isinstance(query, str):
        # At most 18 digits: int() refuses thousands with a plain ValueError.
        # The name may be empty: a class whose label is "" is listed as "(index)".
        option = re.fullmatch(r"(.*?)\s*\(([0-9]{1,18})\)", query.strip())
        if option and int(option[2]) < len(labels) and \
                _fold(labels[int(option[2])]) == _fold(option[1]):
            return int(option[2])  # "name (index)", as the explorers list the classes
        if re.fullmatch(r"-?[0-9]+", query.strip()):
            query = _index_or_digit_name(query.strip(), labels)
    if not isinstance(query, str):
        if not is_integer(query):
            raise PullbackWidgetsTypeError(
                f"class must be an index or a name, got {type(query).__name__}")
        query = int(query)
        if not 0 <= query < len(labels):
            raise PullbackWidgetsError(f"class index {query} is out of range [0, {len(labels)})")
        return query
    wanted = _fold(query)
    if not wanted:  # every name would be a "close match" of nothing
        raise PullbackWidgetsError("class is empty: give a class name or an index")
    lowered = [_fold(label) for label in labels]
    matches = [i for i, name in enumerate(lowered) if name == wanted]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(f"{i}" for i in matches)
        raise PullbackWidgetsError(
            f"class {query!r} is ambiguous: indices {listed}; give the index, or write "
            + " or ".join(repr(f"{labels[i]} ({i})") for i in matches))
    close = close_matches(wanted, lowered, n=4, cutoff=0.6)
    close += [name for name in lowered if wanted in name and name not in close][:4 - len(close)]
    hint = ", ".join(f"{labels[i]!r} ({i})" for c in close
                     for i, name in enumerate(lowered) if name == c)
    raise PullbackWidgetsError(
        f"unknown class {query!r}" + (f"; did you mean {hint}?" if hint else ""))


def _index_or_digit_name(text: str, labels: Sequence[str]) -> int:
    """A digit string as a class index, or as the name of the one class it names where the
    index is out of range (labels such as "7", "3"); both, naming different classes, is
    ambiguous: an error that says how to write either."""
    if len(text.lstrip("-")) > 18:  # int() refuses thousands of digits with a plain ValueError
        raise PullbackWidgetsError(f"class index {text[:20]}... is out of range "
                                   f"[0, {len(labels)})")
    index = int(text)
    named = [i for i, label in enumerate(labels) if _fold(label) == text]
    if not named or named == [index]:
        return index
    if 0 <= index < len(labels) or len(named) > 1:
        readings = [f"{labels[i]} ({i})" for i in named]
        if 0 <= index < len(labels):
            readings.append(f"{labels[index]} ({index})")
        raise PullbackWidgetsError(
            f"class {text!r} is ambiguous: it is a class index and a class name; write "
            + " or ".join(repr(reading) for reading in readings))
    return named[0]


def _fold(name: object) -> str:
    """A class name as compared: stripped, case-folded ("Straße" is "STRASSE") and in Unicode
    normal form NFKC (an "é" typed as "e" and a combining accent is the label's "é")."""
    return unicodedata.normalize("NFKC", str(name)).casefold().strip()

