"""Recipes: every shipped file loads; every kind of bad recipe is one clear line, exit 2."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from nmt.cli import app
from nmt.recipe import RecipeError, Recipe, dump_recipe, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name
    # The dump is itself a valid recipe that resolves to the same thing.
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"multi30k.yaml", "multi30k-en-de.yaml", "multi30k-tiny.yaml", "wmt14-en-de.yaml"} <= names


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BAD = [
    ("train:\n  btach_tokens: 100\n", "unknown key 'train.btach_tokens'; did you mean 'train.batch_tokens'?"),
    ("trian:\n  lr: 0.1\n", "unknown key 'trian'; did you mean 'train'?"),
    ("train:\n  lr: fast\n", "key 'train.lr': expected a number"),
    ("train:\n  lr: -0.1\n", "key 'train.lr': must be > 0.0"),
    ("train:\n  lr: 0\n", "key 'train.lr': must be > 0.0"),
    ("train:\n  batch_tokens: 10.5\n", "key 'train.batch_tokens': expected an integer"),
    ("train:\n  batch_tokens: true\n", "key 'train.batch_tokens': expected an integer"),
    ("model:\n  tie_output: yes please\n", "key 'model.tie_output': expected true or false"),
    ("model:\n  cell: rnn\n", "key 'model.cell': expected one of exact, fused, lstm"),
    ("model:\n  dropout_emb: 1.5\n", "key 'model.dropout_emb': must be <= 0.99"),
    ("model: 3\n", "key 'model': expected a mapping"),
    ("data:\n  test_splits: test\n", "key 'data.test_splits': expected a list"),
    ("data:\n  trg_lang: de\n", "key 'data.trg_lang': must differ"),
    ("data:\n  path: files/{split}.txt\n", "key 'data.path': a file template needs both"),
    ("tokenizer:\n  joint: false\nmodel:\n  tie_all: true\n", "key 'model.tie_all': needs a joint vocabulary"),
    ("model:\n  tie_output: true\n  out_dim: 100\n", "key 'model.out_dim': must equal model.emb_dim"),
    ("train:\n  lr: .nan\n", "expected a finite number"),
    ("train:\n  adam_betas: [2, 3]\n", "key 'train.adam_betas': expected [beta1, beta2], each in [0, 1)"),
    ("train:\n  adam_betas: [0.9, x]\n", "key 'train.adam_betas': expected [beta1, beta2]"),
    ("train:\n  adam_betas: [0.9]\n", "key 'train.adam_betas': expected [beta1, beta2]"),
    ("train:\n  max_steps: 2.5\n", "key 'train.max_steps': expected an integer, got 2.5"),
    ("data:\n  test_splits: [val, val]\n", "key 'data.test_splits': 'val' is a duplicate or not usable"),
    ("data:\n  test_splits: [train]\n", "key 'data.test_splits': 'train' is a duplicate or not usable"),
    ("data:\n  test_splits: [../x]\n", "key 'data.test_splits': '../x' is a duplicate or not usable"),
    ("data:\n  test_splits: [2016]\n", "key 'data.test_splits': 2016 is a duplicate or not usable"),
    ("{[1, 2]: x}\n", "not valid YAML: found unhashable key"),
    ("train:\n  lr: 0.1\nmodel:\n  cell: fused\ntrain:\n  lr: 0.2\n", "line 5: key 'train' given twice"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "line 3: key 'lr' given twice"),
    ("", "recipe is empty"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("train: [unclosed\n", "not valid YAML"),
    ("a: &a [1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
     "f: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n", "too many YAML aliases"),
    ("a:" + " [" * 200 + "]" * 200 + "\n", "nested too deeply"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_recipe_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(RecipeError, match="not a UTF-8 text file"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override,check",
    [
        ("train.lr=0.002", lambda r: r.train.lr == 0.002),
        ("train.lr=1", lambda r: r.train.lr == 1.0 and isinstance(r.train.lr, float)),
        ("model.cell=exact", lambda r: r.model.cell == "exact"),
        ("model.cell=lstm", lambda r: r.model.cell == "lstm"),
        ("data.test_splits=[a, b]", lambda r: r.data.test_splits == ["a", "b"]),
        ("model.tie_output=true", lambda r: r.model.tie_output is True),
        ("name=other", lambda r: r.name == "other"),
        ("train.lr=1e-3", lambda r: r.train.lr == 0.001),
        ("train.lr=5E-4", lambda r: r.train.lr == 0.0005),
        ("train.max_steps=1e3", lambda r: r.train.max_steps == 1000 and isinstance(r.train.max_steps, int)),
        ("name=1e3x", lambda r: r.name == "1e3x"),
        ("name=1e3", lambda r: r.name == "1e3"),  # a string key keeps the text
        ("data.valid_split=2E1", lambda r: r.data.valid_split == "2E1"),
        ("train.adam_betas=[9e-1, 0.98]", lambda r: r.train.adam_betas == [0.9, 0.98]),
    ],
)
def test_overrides_are_typed(tmp_path, override, check):
    assert check(load_recipe(write(tmp_path, "seed: 1\n"), [override]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=abc", "^--set train.lr: expected a number"),
        ("train.adam_betas=[2,3]", "^--set train.adam_betas: expected"),
        ("train.lrr=0.1", "^--set train.lrr: unknown key 'train.lrr'; did you mean 'train.lr'"),
        ("train.lr", "expected key=value"),
        ("seed.x=1", "'seed' is not a section"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "seed: 1\n"), [override])


def test_a_name_that_is_not_a_folder_name_needs_a_run_dir(tmp_path):
    from nmt.runs import RunError, default_run_dir

    recipe = load_recipe(write(tmp_path, "name: ../../elsewhere\n"))  # a stored recipe may have one
    with pytest.raises(RunError, match="recipe name '../../elsewhere' is not a folder name.*--run-dir"):
        default_run_dir(recipe)
    result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1 and "is not a folder name" in result.output and "Traceback" not in result.output


def test_scientific_notation_reads_as_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; recipes take it as a number, as YAML 1.2 does
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 1e-3\n  min_lr: -0e0\n  max_steps: 2E4\n"
                               "  warmup_steps: +1e2\n"))
    assert (recipe.train.lr, recipe.train.min_lr) == (0.001, 0.0)
    assert (recipe.train.max_steps, recipe.train.warmup_steps) == (20000, 100)


def test_defaults_and_name_from_file(tmp_path):
    recipe = load_recipe(write(tmp_path, "seed: 7\n"))
    assert recipe.name == "r"
    assert recipe.model == Recipe().model
    assert recipe.seed == 7


def test_recipes_are_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, "seed: 7\n"))
    with pytest.raises(Exception):
        recipe.seed = 3  # type: ignore[misc]


def test_dump_is_commented_and_reloadable(tmp_path):
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 0.01\n"))
    text = dump_recipe(recipe)
    assert "lr: 0.01  # peak learning rate" in text
    again = load_recipe(write(tmp_path, text))
    assert again == recipe


runner = CliRunner()


def test_cli_recipe_prints_resolved(tmp_path):
    path = write(tmp_path, "seed: 3\n")
    result = runner.invoke(app, ["recipe", str(path), "--set", "train.lr=0.25"])
    assert result.exit_code == 0, result.output
    assert "lr: 0.25" in result.stdout


def test_cli_bad_recipe_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n")
    for command in (["recipe", str(path)], ["preprocess", str(path)], ["train", str(path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2
        assert "Traceback" not in result.output
        assert f"error: {path}: key 'train.lr': must be > 0.0" in result.output
