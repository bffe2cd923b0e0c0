"""Text prompts: class lists, templates, template ensembles and per-class descriptions.

A template is a string in which ``{}`` marks the class name (``"a photo of a {}."``). A template
*set* is a named list of them; open_clip's ImageNet ensembles are imported, not copied.
Descriptions are CuPL-style JSON files ``{"class name": ["sentence", ...]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vprompt.errors import PromptError
from vprompt.utils import jsonio
from vprompt.utils.registry import Registry

MAX_TEXT_FILE_BYTES = 64 * 1024 * 1024

TEMPLATE_SETS: Registry[Callable[[], tuple[str, ...]]] = Registry("template set")


def _from_open_clip(attr: str) -> Callable[[], tuple[str, ...]]:
    def load() -> tuple[str, ...]:
        from open_clip import zero_shot_metadata

        # open_clip stores templates as callables; calling them with "{}" gives format strings.
        return tuple(t("{}") if callable(t) else str(t) for t in getattr(zero_shot_metadata, attr))

    return load


TEMPLATE_SETS.register("default", lambda: ("a photo of a {}.",))
TEMPLATE_SETS.register("openai-imagenet", _from_open_clip("OPENAI_IMAGENET_TEMPLATES"))
TEMPLATE_SETS.register("simple-imagenet", _from_open_clip("SIMPLE_IMAGENET_TEMPLATES"))


def _check_template(template: str, where: str) -> str:
    if template.count("{}") != 1:
        raise PromptError(
            f"{where}: template {template!r} must contain exactly one '{{}}' for the class name"
        )
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError) as exc:
        raise PromptError(
            f"{where}: template {template!r} is not a valid format string: {exc}"
        ) from exc
    if filled.count("\0") != 1:
        # "{{}}" holds "{}" as text but formats to a literal "{}": the name would be missing.
        raise PromptError(
            f"{where}: template {template!r} must contain exactly one '{{}}' for the class name"
        )
    return template


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise PromptError(f"{path}: {what} file not found")
    if path.stat().st_size > MAX_TEXT_FILE_BYTES:
        raise PromptError(f"{path}: {what} file is larger than {MAX_TEXT_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: {what} file is not UTF-8 text ({exc.reason})") from exc


def resolve_templates(spec: str | Sequence[str | Callable[[str], str]] | None) -> tuple[str, ...]:
    """Templates from a set name, a file (one per line), a single template, or a list.

    Args:
        spec: ``None`` (the ``default`` set), a registered set name (``openai-imagenet``), a path
            to a text file with one template per line (blank lines and ``#`` comments skipped),
            a template string containing ``{}``, or a sequence of templates / callables.
    """
    if spec is None:
        return TEMPLATE_SETS.get("default")()
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS.get(spec)()
        path = Path(spec).expanduser()
        if path.is_file():
            lines = [ln.strip() for ln in _read_text(path, "template").splitlines()]
            templates = [ln for ln in lines if ln and not ln.startswith("#")]
            if not templates:
                raise PromptError(f"{path}: template file holds no templates")
            return tuple(_check_template(t, str(path)) for t in templates)
        if "{}" in spec:
            return (_check_template(spec, "--templates"),)
        raise PromptError(
            f"templates {spec!r}: not a template set ({', '.join(TEMPLATE_SETS.names())}), "
            "not an existing file, and no '{}' marks the class name"
        )
    out = []
    for item in spec:
        text = item("{}") if callable(item) else str(item)
        out.append(_check_template(text, "templates"))
    if not out:
        raise PromptError("templates: the list is empty")
    return tuple(out)


def load_class_list(spec: str | Sequence[str], *, from_file: bool = False) -> list[str]:
    """Class names from a comma-separated string, a file (one per line), or a list.

    Names are stripped; empty names and duplicates are errors (they would make labels ambiguous).
    """
    if isinstance(spec, str):
        if from_file:
            path = Path(spec).expanduser()
            names = [ln.strip() for ln in _read_text(path, "class").splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
            where = str(path)
        else:
            names = [n.strip() for n in spec.split(",")]
            where = "--classes"
    else:
        names = [str(n).strip() for n in spec]
        where = "classnames"
    if not names or any(not n for n in names):
        raise PromptError(f"{where}: class names must be non-empty (got {names!r})")
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dups:
        raise PromptError(f"{where}: duplicate class names {dups}")
    return names


def load_descriptions(
    spec: str | Path | Mapping[str, Sequence[str]], classnames: Sequence[str]
) -> dict[str, list[str]]:
    """Per-class descriptions (CuPL JSON ``{class: [sentences]}``), checked against the classes.

    Every class must have at least one non-empty sentence; keys that are not classes are errors
    too, since they usually mean a typo that would silently drop a class's descriptions.
    """
    where = "descriptions"
    if isinstance(spec, str | Path):
        path = Path(spec).expanduser()
        where = str(path)
        try:
            data = jsonio.loads(_read_text(path, "description"), what=str(path))
        except jsonio.JSONInputError as exc:
            raise PromptError(str(exc)) from None
    else:
        data = spec
    if not isinstance(data, Mapping):
        raise PromptError(f"{where}: expected a JSON object {{class: [sentences]}}")
    out: dict[str, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            raise PromptError(f"{where}: descriptions of {key!r} must be a list of strings")
        sentences = [v.strip() for v in value if v.strip()]
        out[str(key)] = sentences
    missing = [c for c in classnames if not out.get(c)]
    extra = sorted(set(out) - set(classnames))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no descriptions for classes {missing[:10]}")
        if extra:
            parts.append(f"descriptions for unknown classes {extra[:10]}")
        raise PromptError(f"{where}: {'; '.join(parts)}")
    return {c: out[c] for c in classnames}


def build_class_prompts(
    classnames: Sequence[str],
    templates: Sequence[str] | None,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> list[list[str]]:
    """The sentences whose embeddings are averaged into each class's embedding.

    Templates are filled with the class name; descriptions are used as written (CuPL). Given
    both, a class's prompts are its filled templates followed by its descriptions.
    """
    prompts: list[list[str]] = []
    for name in classnames:
        own = [t.format(name) for t in templates] if templates else []
        if descriptions is not None:
            own += list(descriptions[name])
        if not own:
            raise PromptError(f"class {name!r} has no prompt (give templates or descriptions)")
        prompts.append(own)
    return prompts
