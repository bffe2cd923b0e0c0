"""Prompt packs on the Hugging Face hub, shared the way PEFT adapters are.

A pack repository holds the pack as ``prompt.safetensors`` and a generated model card
(``README.md``). :func:`push_pack` uploads both in one commit, :func:`pull_pack` downloads the
pack into the hub's cache, and ``load_pack("hf-hub:ORG/REPO[@REVISION]")`` reads a pack
straight from the hub: a pack the user names is theirs to download (the weights it names are
not: see :func:`vprompt.engine.pack.build_from_pack`). Nothing is ever unpickled: the
downloaded file goes through :func:`~vprompt.engine.pack.load_pack`'s strict reading.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from vprompt.errors import ConfigError, PackError

HUB_PREFIX = "hf-hub:"
PACK_FILENAME = "prompt.safetensors"
CARD_FILENAME = "README.md"
_MAX_CARD_CLASSES = 50


def validate_repo_id(repo_id: str) -> str:
    """``repo_id`` checked against the hub's naming rules (``NAME`` or ``ORG/NAME``).

    Raises:
        ConfigError: One line naming the id and the rule it breaks.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ConfigError("a hub repository id is needed (ORG/NAME)")
    try:
        hub_validate(repo_id)
    except HFValidationError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ConfigError(f"invalid hub repository id {repo_id!r}: {reason}") from None
    return repo_id


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/REPO[@REVISION]`` → ``(repo_id, revision)`` (revision None when absent)."""
    if not spec.startswith(HUB_PREFIX):
        raise ConfigError(f"{spec!r}: a hub pack is named hf-hub:ORG/REPO[@REVISION]")
    rest = spec[len(HUB_PREFIX) :]
    repo_id, sep, revision = rest.partition("@")
    if sep and not revision.strip():
        raise ConfigError(f"{spec!r}: empty revision after '@' (hf-hub:ORG/REPO@REVISION)")
    return validate_repo_id(repo_id), (revision if sep else None)


def is_hub_spec(path: object) -> bool:
    """Whether ``path`` names a pack on the hub (``hf-hub:…``, also as a ``Path``: the
    server's ``--pack NAME=PATH``) rather than a file."""
    if not isinstance(path, str | os.PathLike):
        return False
    text = os.fspath(path)
    return isinstance(text, str) and text.startswith(HUB_PREFIX)


def resolve_hub_spec(spec: str | os.PathLike[str]) -> Path:
    """The local file (in the hub cache) for ``hf-hub:ORG/REPO[@REVISION]``, downloaded if
    needed (the hub's offline mode, ``HF_HUB_OFFLINE=1``, reads the cache only)."""
    try:
        repo_id, revision = parse_hub_spec(os.fspath(spec))
    except ConfigError as exc:  # load_pack's problems are all PackErrors
        raise PackError(str(exc)) from None
    return pull_pack(repo_id, revision=revision)


def pull_pack(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Path:
    """Download a repository's ``prompt.safetensors`` into the hub cache; its local path.

    The file is not read here: :func:`~vprompt.engine.pack.load_pack` validates it.

    Raises:
        ConfigError: An invalid repository id.
        PackError: One line for a missing repository or revision, a repository without
            ``prompt.safetensors``, a gated one, or no network (or offline mode) with nothing
            cached.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from vprompt.backbones.downloads import offline_unless_reachable

    validate_repo_id(repo_id)
    where = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    quick = contextlib.ExitStack()  # no retries against a hub that does not answer
    unanswered: str | None = None
    try:
        unanswered = quick.enter_context(offline_unless_reachable(not local_files_only))
        file = hf_hub_download(
            repo_id,
            PACK_FILENAME,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            local_files_only=local_files_only,
            library_name="vprompt",
        )
    except GatedRepoError:
        raise PackError(
            f"{where}: a gated repository; accept its terms on the hub and log in "
            "(`hf auth login` or HF_TOKEN) to download it"
        ) from None
    except RevisionNotFoundError:
        raise PackError(f"{where}: the repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise PackError(
            f"{where}: no such repository on the hub (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN)"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if local_files_only:
            why, fix = "only local files were allowed", "allow downloads"
        elif unanswered is not None:
            why, fix = (
                f"the hub cannot be reached ({unanswered})",
                "check the network and HF_ENDPOINT",
            )
        elif constants.HF_HUB_OFFLINE:
            why, fix = "the hub is offline (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE"
        else:
            why, fix = "the hub cannot be reached", "check the network and HF_ENDPOINT"
        pull = f"vprompt pack pull {repo_id}" + (f" --revision {revision}" if revision else "")
        raise PackError(
            f"{where}: {PACK_FILENAME} is not in this machine's Hugging Face cache and {why}: "
            f"{fix} to download it, or run `{pull} --out FILE` on a machine that can reach "
            "the hub and use that FILE"
        ) from None
    except EntryNotFoundError:
        raise PackError(
            f"{where}: the repository has no {PACK_FILENAME} (not a vprompt prompt pack "
            "repository; push one with `vprompt pack push`)"
        ) from None
    except HfHubHTTPError as exc:
        raise PackError(f"{where}: cannot download {PACK_FILENAME}: {_first_line(exc)}") from None
    finally:
        quick.close()
    if not isinstance(file, str | os.PathLike):  # a dry run's info: never asked for
        raise PackError(f"{where}: the hub returned no file")
    return Path(file)


def model_card(pack: Any, repo_id: str) -> str:
    """The ``README.md`` for a pack repository: YAML front matter and a short description."""
    from huggingface_hub import ModelCardData

    base = base_model_id(pack.backbone.weights)
    data = ModelCardData(
        library_name="vprompt",
        tags=["vprompt", "prompt-learning", pack.method],
        base_model=base,
    )
    bb = pack.backbone
    shown = pack.classnames[:_MAX_CARD_CLASSES]
    classes = ", ".join(f"`{_plain(c)}`" for c in shown)
    if len(pack.classnames) > len(shown):
        classes += f" … and {len(pack.classnames) - len(shown)} more"
    lines = [
        "---",
        data.to_yaml().strip(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A vprompt prompt pack: a `{pack.method}` prompt for the frozen `{bb.name}`.",
        "",
        f"- **Method:** `{pack.method}`",
        f"- **Backbone:** `{bb.name}`, weights `{_plain(bb.weights)}` "
        f"(fingerprint `{bb.fingerprint}`)",
        f"- **Parameters:** {pack.num_parameters():,}",
        f"- **Classes ({len(pack.classnames)}):** {classes}",
    ]
    if pack.vprompt_version:
        lines.append(f"- **vprompt version:** {pack.vprompt_version}")
    if pack.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        for key, value in sorted(pack.metrics.items()):
            lines.append(f"| {_plain(str(key))} | {_metric(value)} |")
    lines += [
        "",
        "## How to use",
        "",
        "```bash",
        f"vprompt predict --pack {HUB_PREFIX}{repo_id} image.jpg",
        "```",
        "",
        "```python",
        "from vprompt.engine.pack import build_from_pack, load_pack",
        "",
        f'pack = load_pack("{HUB_PREFIX}{repo_id}")',
        "method = build_from_pack(pack)  # the pack's backbone weights, from this machine",
        'print(method.predict(["image.jpg"], top_k=3))',
        "```",
        "",
        "The pack names the backbone weights it was made with but never downloads them: pass "
        "`--weights` (or `weights=`) or `--allow-download` (`allow_download=True`) when they "
        "are not on this machine.",
        "",
    ]
    return "\n".join(lines)


def base_model_id(weights: str) -> str | None:
    """The hub id of a backbone weight source, when it names one (``hf-hub:ORG/REPO``)."""
    if not weights.startswith(HUB_PREFIX):
        return None
    repo = weights[len(HUB_PREFIX) :]
    try:
        validate_repo_id(repo)
    except ConfigError:
        return None
    return repo if "/" in repo else None


def push_pack(
    pack_path_or_pack: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a pack (a file or a :class:`~vprompt.engine.pack.PromptPack`) to ``repo_id``
    as ``prompt.safetensors`` plus a generated model card, in one commit.

    Returns:
        The repository's URL.

    Raises:
        ConfigError: An invalid repository id.
        PackError: The file is not a prompt pack, or the hub refused or could not be reached
            (one line).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from vprompt.engine.pack import PromptPack, load_pack, save_pack

    validate_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="vprompt-push-") as tmp:
        if isinstance(pack_path_or_pack, PromptPack):
            pack = pack_path_or_pack
            file = save_pack(pack, Path(tmp) / PACK_FILENAME)
            pack = load_pack(file)
        else:
            file = Path(pack_path_or_pack)
            if is_hub_spec(pack_path_or_pack):
                raise PackError(f"{pack_path_or_pack}: push a local pack file, not a hub pack")
            pack = load_pack(file)  # refuses anything that is not a pack
        card = model_card(pack, repo_id).encode("utf-8")
        api = HfApi(token=token, library_name="vprompt")
        message = commit_message or f"Upload {pack.method} prompt pack with vprompt"
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.create_commit(
                repo_id,
                [
                    CommitOperationAdd(path_in_repo=PACK_FILENAME, path_or_fileobj=str(file)),
                    CommitOperationAdd(path_in_repo=CARD_FILENAME, path_or_fileobj=card),
                ],
                commit_message=message,
                repo_type="model",
            )
        except Exception as exc:  # the hub's HTTP, auth and network errors come in many types
            raise PackError(f"cannot push to {HUB_PREFIX}{repo_id}: {_hub_reason(exc)}") from None
    return str(url)


def _hub_reason(exc: BaseException) -> str:
    """One line for a failed hub call: no network, not logged in, refused, or its message."""
    from vprompt.backbones.downloads import unreachable

    text = _first_line(exc)
    if unreachable(exc) or _is_connection_error(exc):
        return (
            f"the hub cannot be reached ({text}); check the network, HF_ENDPOINT and "
            "HF_HUB_OFFLINE (must be unset to push)"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return f"not allowed ({text}); log in with `hf auth login` or pass --token"
    return text


def _is_connection_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    hops = 0
    while seen is not None and hops < 20:
        name = type(seen).__name__
        if "Connect" in name or "Timeout" in name or "NetworkError" in name:
            return True
        seen, hops = seen.__cause__ or seen.__context__, hops + 1
    return False


def _first_line(exc: BaseException) -> str:
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    # The hub's HTTP errors start with a bare "404 Client Error." line: add the next one.
    first = " ".join(lines[:2]) if lines and lines[0].endswith("Error.") else ""
    first = first or (lines[0] if lines else type(exc).__name__)
    return first if len(first) <= 240 else first[:239] + "…"


def _plain(text: str) -> str:
    """Text safe inside a card's inline code or table cell (one line, no backticks/pipes)."""
    return " ".join(str(text).split()).replace("`", "'").replace("|", "/")


def _metric(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, list):
            return f"({len(value)} values)"
        if isinstance(value, dict):
            return f"({len(value)} entries)"
        return _plain(str(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)
