"""Text prompts: template sets and files, class lists, description files, class prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from open_clip import zero_shot_metadata

from vprompt.errors import PromptError, UnknownNameError
from vprompt.prompts import (
    TEMPLATE_SETS,
    build_class_prompts,
    load_class_list,
    load_descriptions,
    resolve_templates,
)

# --------------------------------------------------------------------------- templates


def test_default_set() -> None:
    assert resolve_templates(None) == ("a photo of a {}.",)
    assert resolve_templates("default") == ("a photo of a {}.",)


def test_openai_imagenet_set_is_open_clips() -> None:
    templates = resolve_templates("openai-imagenet")
    assert len(templates) == 80
    assert templates == tuple(t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    assert "a bad photo of a {}." in templates
    assert all(t.count("{}") == 1 for t in templates)
    assert len(set(templates)) == 80


def test_simple_imagenet_set() -> None:
    templates = resolve_templates("simple-imagenet")
    assert templates == tuple(t("{}") for t in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)
    assert 1 < len(templates) < 80


def test_template_sets_registry() -> None:
    assert {"default", "openai-imagenet", "simple-imagenet"} <= set(TEMPLATE_SETS.names())
    with pytest.raises(UnknownNameError, match="did you mean 'openai-imagenet'"):
        TEMPLATE_SETS.get("openai-imagenett")


def test_template_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "templates.txt"
    path.write_text(
        "# my templates\n\n  a photo of a {}.  \n\t\n# another comment\nan origami {}.\n",
        encoding="utf-8",
    )
    assert resolve_templates(str(path)) == ("a photo of a {}.", "an origami {}.")


def test_template_file_with_unicode_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "templates.txt"
    path.write_bytes("une photo d'un {}.\r\nein Foto von {} — groß.\r\n".encode())
    assert resolve_templates(str(path)) == ("une photo d'un {}.", "ein Foto von {} — groß.")


def test_template_file_with_bad_line_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\na photo without a placeholder\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"templates\.txt.*placeholder.*exactly one"):
        resolve_templates(str(path))


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n\n# and another\n"])
def test_empty_template_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "templates.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptError, match="holds no templates"):
        resolve_templates(str(path))


def test_template_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "templates.txt"
    path.write_bytes(b"a photo of a {}.\n\xff\xfe\xfa\n")
    with pytest.raises(PromptError, match="not UTF-8"):
        resolve_templates(str(path))


def test_single_template_string() -> None:
    assert resolve_templates("a sketch of a {}.") == ("a sketch of a {}.",)


def test_template_list_and_callables() -> None:
    got = resolve_templates(["a {}.", lambda c: f"itap of a {c}."])
    assert got == ("a {}.", "itap of a {}.")


@pytest.mark.parametrize(
    "bad",
    [
        "a photo of a {} and a {}.",  # two placeholders
        "a {{}} photo of a cat",  # an escaped brace is text, not a placeholder
        "a photo of a {name}.{}",  # named field
        "a photo of a {0}",  # numbered field, not {}
        "a photo of {} {",  # unbalanced
    ],
)
def test_invalid_template_strings(bad: str) -> None:
    with pytest.raises(PromptError, match="template"):
        resolve_templates([bad])


def test_string_that_is_no_set_file_or_template() -> None:
    with pytest.raises(PromptError, match=r"not a template set \(default, openai-imagenet"):
        resolve_templates("a photo of a cat")
    with pytest.raises(PromptError, match="not an existing file"):
        resolve_templates("missing-templates.txt")


def test_single_string_with_two_placeholders() -> None:
    with pytest.raises(PromptError, match="exactly one"):
        resolve_templates("a {} of a {}")


def test_empty_template_list() -> None:
    with pytest.raises(PromptError, match="empty"):
        resolve_templates([])


def test_prompt_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["no placeholder"])


# --------------------------------------------------------------------------- class lists


def test_class_list_from_comma_string() -> None:
    assert load_class_list(" cat, dog ,  golden retriever ") == ["cat", "dog", "golden retriever"]


def test_class_list_from_sequence() -> None:
    assert load_class_list(["cat ", " dog"]) == ["cat", "dog"]
    assert load_class_list([1, 2]) == ["1", "2"]
    assert load_class_list(("a",)) == ["a"]


def test_class_list_from_file(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# pets\ncat\n\n  dog  \nsea lion, the big one\n", encoding="utf-8")
    assert load_class_list(str(path), from_file=True) == ["cat", "dog", "sea lion, the big one"]


def test_class_file_missing(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="class file not found"):
        load_class_list(str(tmp_path / "nope.txt"), from_file=True)


def test_class_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(PromptError, match="non-empty"):
        load_class_list(str(path), from_file=True)


@pytest.mark.parametrize("spec", ["cat,,dog", "cat, ", ",", ["cat", "  "], []])
def test_empty_class_names(spec) -> None:
    with pytest.raises(PromptError, match="non-empty"):
        load_class_list(spec)


@pytest.mark.parametrize(
    ("spec", "dups"),
    [("cat,dog,cat", "['cat']"), (["b", "a", "b ", "a", "c"], "['a', 'b']")],
)
def test_duplicate_class_names(spec, dups: str) -> None:
    with pytest.raises(PromptError, match=r"duplicate class names") as info:
        load_class_list(spec)
    assert dups in str(info.value)


# --------------------------------------------------------------------------- descriptions

CLASSES = ["cat", "dog"]
DESCRIPTIONS = {
    "dog": ["A dog has four legs.", "  Dogs bark.  "],
    "cat": ["A cat has whiskers."],
}


def test_descriptions_from_mapping_follow_class_order() -> None:
    got = load_descriptions(DESCRIPTIONS, CLASSES)
    assert list(got) == CLASSES
    assert got == {"cat": ["A cat has whiskers."], "dog": ["A dog has four legs.", "Dogs bark."]}


def test_descriptions_from_file(tmp_path: Path) -> None:
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(DESCRIPTIONS), encoding="utf-8")
    assert load_descriptions(str(path), CLASSES) == load_descriptions(path, CLASSES)
    assert load_descriptions(path, CLASSES)["dog"] == ["A dog has four legs.", "Dogs bark."]


def test_description_string_is_one_sentence() -> None:
    got = load_descriptions({"cat": "A cat.", "dog": ["A dog."]}, CLASSES)
    assert got == {"cat": ["A cat."], "dog": ["A dog."]}


def test_descriptions_missing_classes() -> None:
    with pytest.raises(PromptError, match=r"no descriptions for classes \['dog'\]"):
        load_descriptions({"cat": ["A cat."]}, CLASSES)


def test_descriptions_with_only_blank_sentences_count_as_missing() -> None:
    with pytest.raises(PromptError, match=r"no descriptions for classes \['dog'\]"):
        load_descriptions({"cat": ["A cat."], "dog": ["  ", ""]}, CLASSES)


def test_descriptions_extra_keys() -> None:
    data = {**DESCRIPTIONS, "doge": ["A meme."]}
    with pytest.raises(PromptError, match=r"descriptions for unknown classes \['doge'\]"):
        load_descriptions(data, CLASSES)


def test_descriptions_missing_and_extra_in_one_message() -> None:
    with pytest.raises(
        PromptError, match=r"no descriptions.*\['dog'\].*unknown classes.*\['dgo'\]"
    ):
        load_descriptions({"cat": ["A cat."], "dgo": ["A dog."]}, CLASSES)


def test_descriptions_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "cupl.json"
    path.write_text('{"cat": ["A cat."],\n "dog": [}', encoding="utf-8")
    with pytest.raises(PromptError, match=r"cupl\.json: not valid JSON .* line 2"):
        load_descriptions(path, CLASSES)


@pytest.mark.parametrize("data", [["A cat.", "A dog."], "just text", 3, None])
def test_descriptions_not_an_object(tmp_path: Path, data) -> None:
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PromptError, match="expected a JSON object"):
        load_descriptions(path, CLASSES)


@pytest.mark.parametrize("value", [{"a": "b"}, [1, 2], ["ok", None], 5])
def test_description_values_must_be_strings(value) -> None:
    with pytest.raises(PromptError, match=r"descriptions of 'cat' must be a list of strings"):
        load_descriptions({"cat": value, "dog": ["A dog."]}, CLASSES)


def test_descriptions_file_missing(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="description file not found"):
        load_descriptions(tmp_path / "nope.json", CLASSES)


# ------------------------------------------------------------------------ class prompts


def test_class_prompts_templates_only() -> None:
    got = build_class_prompts(CLASSES, ["a {}.", "two {}s."])
    assert got == [["a cat.", "two cats."], ["a dog.", "two dogs."]]


def test_class_prompts_descriptions_only() -> None:
    desc = load_descriptions(DESCRIPTIONS, CLASSES)
    assert build_class_prompts(CLASSES, None, desc) == [desc["cat"], desc["dog"]]
    assert build_class_prompts(CLASSES, (), desc) == [desc["cat"], desc["dog"]]


def test_class_prompts_templates_then_descriptions() -> None:
    desc = load_descriptions(DESCRIPTIONS, CLASSES)
    got = build_class_prompts(CLASSES, ["a {}."], desc)
    assert got == [
        ["a cat.", "A cat has whiskers."],
        ["a dog.", "A dog has four legs.", "Dogs bark."],
    ]


def test_class_prompts_need_something() -> None:
    with pytest.raises(PromptError, match="class 'cat' has no prompt"):
        build_class_prompts(CLASSES, None)


def test_class_name_with_braces_is_inserted_verbatim() -> None:
    assert build_class_prompts(["{weird}"], ["a {}."]) == [["a {weird}."]]
