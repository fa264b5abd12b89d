"""Experiment configuration: schema validation, the subjects table and the model folders (the
arms it runs: `grid`).

Every error names the file, the key path (or table row and column) and what was expected, so a
researcher can fix a config without reading this code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sidpipe.io import SidpipeError, expand_home, looks_local, read_yaml
from sidpipe.subsets import SEPARATOR

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "rules" / "schemas"
TINY_MODELS_DIR = "results/models/tiny"
DEFAULT_INFERENCE = "standard"  # a grid that names no inference setting samples this one


def grid_inference(grid: dict) -> list[str]:
    """The inference settings an experiment grid samples."""
    return grid.get("inference", [DEFAULT_INFERENCE])


class ConfigError(SidpipeError):
    """The config or a table it points to is invalid."""


def load_schema(name: str, schema_dir: Path = SCHEMA_DIR) -> dict:
    with open(schema_dir / f"{name}.schema.yaml") as handle:
        return yaml.safe_load(handle)


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """A short human sentence for one schema violation."""
    where = _key_path(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{where}: unknown key {', '.join(map(repr, extra))}{hint}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator == "propertyNames":
        return f"{where}: name {error.instance!r} is not allowed: {error.message}"
    expected = schema.get("description") or _in_words(schema)
    if _may_hold_a_secret(error.absolute_path):
        # A key pasted where its variable's name belongs must not reach the terminal or a log.
        return f"{where}: invalid value (not shown: it may be a secret); expected {expected}"
    return (
        f"{where}: {error.instance!r} is invalid ({error.message}); expected {expected}"
        + _yaml_hint(error.instance, schema)
    )


_WORDS = {"number": "a number", "integer": "a whole number", "string": "text"}
_WORDS |= {"boolean": "true or false", "array": "a list", "object": "a mapping"}
_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _in_words(schema: dict) -> str:
    """What a schema without a description asks for, e.g. "a number > 0" (else its JSON)."""
    rest = {k: v for k, v in schema.items() if k not in {"description", "type", *_BOUNDS}}
    kind = schema.get("type")
    if rest or not isinstance(kind, str) or kind not in _WORDS:
        return json.dumps({k: v for k, v in schema.items() if k != "description"})
    bounds = [f"{sign} {schema[key]}" for key, sign in _BOUNDS.items() if key in schema]
    return " ".join([_WORDS[kind], " and ".join(bounds)]).strip()


_YAML_FLOAT = re.compile(r"[+-]?(\d+|\d*\.\d+)[eE][+-]?\d+")


def _yaml_hint(value: Any, schema: dict) -> str:
    """The YAML traps behind most type errors: PyYAML reads 1e-4 (no dot) as text, 1e3 written
    as 1.0e+3 is a float where a whole number belongs, and bare no/yes/on/off are booleans."""
    types = schema.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    whole = "integer" in types and "number" not in types
    if isinstance(value, str) and _YAML_FLOAT.fullmatch(value) and {"number", "integer"} & types:
        mantissa, _, exponent = value.lower().partition("e")
        exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
        number = float(f"{mantissa}e{exponent}")
        if whole and number.is_integer():
            return f" (YAML reads {value} as text: write {int(number)})"
        return f" (YAML reads {value} as text: write {float(mantissa)}e{exponent})"
    if isinstance(value, float) and whole and value.is_integer():
        return f" (write {int(value)}, without a decimal point)"
    strings = [v for v in schema.get("enum", []) if isinstance(v, str)]
    if isinstance(value, bool) and ("string" in types or strings):
        spelled = {True: ("yes", "on", "true", "y"), False: ("no", "off", "false", "n")}[value]
        words = [v for v in strings if v.lower() in spelled] or [spelled[0]]
        return f" (YAML reads a bare {words[0]} as {value}: quote it, '{words[0]}')"
    return ""


_SECRET_WORDS = re.compile(r"(^|_)(key|token)(_|$)|secret|password", re.IGNORECASE)


def _may_hold_a_secret(path) -> bool:
    """The key itself, not the names above it (an experiment may be called `key_ablation`)."""
    keys = [part for part in path if isinstance(part, str)]
    return bool(keys) and bool(_SECRET_WORDS.search(keys[-1]))


# A whole number is an int: JSON Schema also takes 1000.0, which then fails in range() in a job.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


def validate_against_schema(data: Any, schema: dict, source: str) -> None:
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n  ".join(_describe(e) for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}")


def _check_references(config: dict, source: str) -> None:
    """Names used in experiments, description sets and inference settings must be defined."""
    problems = []

    def check(kind: str, value: str, where: str) -> None:
        defined = config.get(kind) or {}
        if value not in defined:
            what = {
                "descriptions": "description set",
                "inference": "inference setting",
            }.get(kind, kind[:-1])
            problems.append(
                f"{where}: unknown {what} {value!r} "
                f"(defined under `{kind}`: {', '.join(sorted(defined)) or 'none'})"
            )

    for name, grids in config["experiments"].items():
        for index, grid in enumerate(grids):
            for key, kind in (("methods", "methods"), ("descriptions", "descriptions")):
                for value in grid[key]:
                    check(kind, value, f"experiments.{name}[{index}].{key}")
            for value in grid.get("inference", []):
                check("inference", value, f"experiments.{name}[{index}].inference")
    for method in config["methods"]:
        if SEPARATOR in method:
            problems.append(
                f"methods.{method}: {SEPARATOR!r} is reserved for reference subsets (a grid's "
                "`references` makes <method>--first<k>); rename the method"
            )
    for name, entry in config["descriptions"].items():
        if entry["case"] > 1 and "vlm" not in entry:
            problems.append(f"descriptions.{name}: case {entry['case']} needs a `vlm`")
        if "vlm" in entry:
            check("vlms", entry["vlm"], f"descriptions.{name}.vlm")
    for name in (config.get("attention") or {}).get("experiments", []):
        check("experiments", name, "attention.experiments")
    attention, sampling = config.get("attention") or {}, config["sampling"]
    for key, count, setting in (
        ("prompt_ids", sampling["prompts_per_subject"], "prompts_per_subject"),
        ("seeds", sampling["seeds"], "seeds"),
    ):
        outside = sorted(i for i in attention.get(key, []) if i >= count)
        if outside:
            # The maps are drawn from the sampled images' prompts and seeds: others would be
            # dropped without a word.
            problems.append(
                f"attention.{key}: {', '.join(map(str, outside))} not sampled (sampling."
                f"{setting} is {count}: ids 0-{count - 1}); choose among those"
            )
    sampled = {
        inference
        for grids in config["experiments"].values()
        for grid in grids
        for inference in grid_inference(grid)
    }
    for name, entry in config["inference"].items():
        if "negative_prompt_from" in entry:
            field = f"inference.{name}.negative_prompt_from"
            check("descriptions", entry["negative_prompt_from"], field)
            chosen = config["descriptions"].get(entry["negative_prompt_from"]) or {}
            if chosen.get("case") == 1 and name in sampled:
                # "a [V] mug" has no non-subject part: the negative prompt would be empty and
                # the arm the standard one.
                problems.append(
                    f"{field}: {entry['negative_prompt_from']!r} is a Case-1 set, whose "
                    "descriptions name nothing beside the subject; name a set of Case 2-4"
                )
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))


def check_mask_models(
    config: dict, mask_backends: dict[str, str], attention_mapped: bool, source: str
) -> None:
    """The models that find subjects must be set before any job needs them: Grounded-SAM
    (`models.grounding_dino`, `models.sam`) for subjects masked with `grounded_sam` and for
    attention maps with `attention.masks: grounded_sam` (the default), `models.judge` for
    `attention.masks: judge`. mask_backends: subject -> its mask backend."""
    models = config["models"]
    unset = [f"models.{key}" for key in ("grounding_dino", "sam") if not models.get(key)]
    problems = []
    grounded = sorted(name for name, backend in mask_backends.items() if backend == "grounded_sam")
    if grounded and unset:
        problems.append(
            f"{' and '.join(unset)} not set, but subject(s) {', '.join(grounded)} find their "
            "masks with Grounded-SAM (segmentation.backend, or the subjects table's "
            "mask_backend): set the model(s), or give the subjects `provided` masks"
        )
    masks = (config.get("attention") or {}).get("masks", "grounded_sam")
    if attention_mapped and masks == "grounded_sam" and unset:
        problems.append(
            f"{' and '.join(unset)} not set, but attention maps find the subject in generated "
            "images with Grounded-SAM (attention.masks, default grounded_sam): set the "
            "model(s), or `attention.masks: judge` with models.judge"
        )
    if attention_mapped and masks == "judge" and not models.get("judge"):
        problems.append(
            "models.judge not set, but attention.masks is judge: set models.judge (a folder "
            "written by pretrain_world), or `attention.masks: grounded_sam`"
        )
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))


def validate_config(config: dict, source: str = "config", schema_dir: Path = SCHEMA_DIR) -> dict:
    """Validate a loaded config against the schema and its cross-references; return it."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level")
    validate_against_schema(config, load_schema("config", schema_dir), source)
    _check_references(config, source)
    return config


def check_config_files(paths: list[str | Path]) -> None:
    """What Snakemake's own reading of the config files lets pass: a key written twice in one
    mapping (the last one silently wins) and a number with a leading zero (`references: 03` is
    the count 3, not image 03); each a ConfigError naming the file, line and column."""
    for path in paths:
        try:
            read_yaml(path, "config file", refuse_leading_zeros=True)
        except SidpipeError as err:
            raise ConfigError(str(err)) from None


def load_config(path: str | Path, schema_dir: Path = SCHEMA_DIR) -> dict:
    """Read (a syntax error names the line and column) and validate a config file."""
    try:
        data = read_yaml(path, "config file", refuse_leading_zeros=True)
    except SidpipeError as err:
        raise ConfigError(str(err)) from None
    return validate_config(data, str(path), schema_dir)


# The names the subject pattern allows that pandas reads as missing (its default NA strings).
MISSING_VALUE_NAMES = frozenset({"NA", "NULL", "NaN", "None", "nan", "null"})


def load_subjects(
    path: str | Path, config: dict, base_dir: str | Path = ".", schema_dir: Path = SCHEMA_DIR
) -> list[dict[str, str]]:
    """Read and validate the subjects table; relative image folders resolve against base_dir.

    Folders of `local` subjects must exist now; those of downloaded subjects appear when their
    dataset is fetched, so only their dataset name is checked.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"subjects table {path} does not exist (config key `subjects`)")
    schema = load_schema("subjects", schema_dir)
    # utf-8-sig: spreadsheet programs often save a byte-order mark before the header
    raw, starts = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
        lines = io.StringIO(text, newline="").readlines()  # split as the reader splits
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
        # restkey None collects surplus fields (tabs inside a value): reported below
        header = reader.fieldnames or []
        end = reader.line_num  # the header's line
        for row in reader:
            # The row's first line: after the last row's (a quoted value may span lines),
            # past the blank lines the reader skips.
            start = end + 1
            while start <= len(lines) and not lines[start - 1].strip("\r\n"):
                start += 1
            raw.append(row)
            starts.append(start)
            end = reader.line_num
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: byte {err.start} is not UTF-8 ({err.reason}); save the subjects table as "
            "UTF-8 text, tab-separated (a spreadsheet's 'Unicode text' is UTF-16)"
        ) from None
    # restval None marks the fields a short row lacks: a missing required one is reported
    # below; trailing optional ones (an editor trims the tab before an empty last column)
    # read as ""
    lacking = [[k for k, v in row.items() if k is not None and v is None] for row in raw]
    rows = [{k: v if k is None else (v or "").strip() for k, v in row.items()} for row in raw]
    missing_cols = [c for c in schema["required"] if c not in header]
    if missing_cols:
        raise ConfigError(
            f"{path}: missing column(s) {', '.join(missing_cols)}; the header must be "
            f"tab-separated: {chr(9).join(schema['required'])}"
        )
    problems, seen, folders = [], {}, {}
    if repeated := sorted({c for c in header if header.count(c) > 1}):
        problems.append(f"line 1: column(s) {', '.join(map(repr, repeated))} appear twice")
    # An unknown column is named once, against the header, not on every row.
    unknown = [c for c in header if c not in schema["properties"]]
    if unknown:
        problems.append(
            f"line 1: unknown column(s) {', '.join(map(repr, unknown))} (columns: "
            f"{', '.join(schema['properties'])})"
        )
    datasets = config.get("datasets") or {}
    for line, row, absent, read in zip(starts, rows, lacking, raw, strict=True):
        if None in row:
            problems.append(f"line {line}: more fields than columns (tabs inside a value?)")
            continue
        if spanning := [k for k, v in read.items() if v and ("\n" in v or "\r" in v)]:
            problems.append(
                f"line {line}: {', '.join(spanning)} runs over several lines: a double quote "
                '(") opens a quoted value there and swallows the lines up to the next one; '
                "remove it or close it"
            )
            continue
        if set(absent) & set(schema["required"]):
            problems.append(
                f"line {line}: {len(header) - len(absent)} tab-separated field(s), the header "
                f"has {len(header)} (a space instead of a tab?)"
            )
            continue
        known = {k: v for k, v in row.items() if k not in unknown}
        for error in _Validator(schema).iter_errors(known):
            problems.append(f"line {line}: " + _describe(error))
        name = row.get("subject", "")
        if name in MISSING_VALUE_NAMES:
            problems.append(
                f"line {line}: subject {name!r} reads as a missing value in the result tables "
                "(pandas); rename it"
            )
        if row.get("kind") == "concept" and not row.get("concept"):
            problems.append(
                f"line {line}: subject {name!r} is of kind concept but has no `concept` (add the "
                "column and write the concept in words, e.g. frozen or upside down)"
            )
        elif row.get("concept") and row.get("kind") != "concept":
            problems.append(
                f"line {line}: subject {name!r} has a `concept` but is of kind "
                f"{row.get('kind')!r}; make it kind concept or leave the concept empty"
            )
        if name in seen:
            problems.append(f"line {line}: duplicate subject {name!r} (first on line {seen[name]})")
        seen.setdefault(name, line)
        # One folder for two subjects is a copy-paste slip: one of them trains on the other's
        # photos.
        folder = Path(base_dir) / row.get("images", "")
        images = str(folder.resolve()) if row.get("source") == "local" else row.get("images", "")
        where = (row.get("source", ""), os.path.normpath(images))
        if where in folders:
            other, other_line = folders[where]
            problems.append(
                f"line {line}: subject {name!r}: image folder {row.get('images')!r} is also "
                f"subject {other!r}'s (line {other_line}); give each subject its own photos"
            )
        folders.setdefault(where, (name, line))
        if row.get("source") == "local":
            if not folder.is_dir():
                problems.append(
                    f"line {line}: subject {name!r}: image folder {folder} does not exist "
                    "(column `images`, relative to the working directory)"
                )
        elif row.get("source") and row["source"] not in datasets:
            problems.append(
                f"line {line}: subject {name!r}: source {row['source']!r} is neither 'local' "
                f"nor a dataset under `datasets` ({', '.join(sorted(datasets)) or 'none'})"
            )
    if not rows:
        problems.append("no subjects")
    if problems:
        raise ConfigError(f"{path}: invalid subjects table:\n  " + "\n  ".join(problems))
    return rows


def check_model_folders(config: dict, source: str, base_dir: str | Path = ".") -> None:
    """Every `models.*` value that reads as a local folder (see `io.looks_local`) must be one
    now, so a typo fails at load instead of in a job hours later (or, offline, as an empty
    tokenizer that miscounts every description). Folders the workflow builds (under
    `results/`) are exempt."""
    for key, value in config["models"].items():
        model = expand_home(value)
        if model.startswith("results/") or not looks_local(model, base_dir):
            continue
        if (Path(base_dir) / model).is_dir():  # an absolute `model` replaces base_dir
            continue
        # Local yet shaped like 'org/name': looks_local saw the folder `org` (or a file).
        why = (
            f" ({model.split('/')[0]}/ is, so it reads as a local path, not a hub id)"
            if model.count("/") == 1 and not model.startswith((".", "~", "/"))
            else ""
        )
        raise ConfigError(
            f"{source}: models.{key}: {value!r} is no folder here{why}; give the folder of a "
            "model written by save_pretrained (relative to the workflow's directory) or a hub "
            "id ('org/name')"
        )


def tiny_model_keys(config: dict) -> dict[str, str]:
    """Model settings that point at the tiny models this workflow builds itself."""
    return {
        key: value
        for key, value in config["models"].items()
        if value.startswith(TINY_MODELS_DIR + "/")
    }


def tokenizer_corpus(files: list[str | Path], classes: list[str], identifier: str) -> list[str]:
    """Training texts for the tiny demo tokenizer, deterministic for the same inputs.

    Prompt templates are filled with every class and the identifier; YAML files contribute
    every string they hold (descriptions with [V] replaced by the identifier); TSVs their cells.
    """
    texts: set[str] = set()

    def strings(node: Any):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    for file in map(Path, files):
        if file.suffix in {".yaml", ".yml"}:
            for text in strings(read_yaml(file)):
                for cls in classes if "{class}" in text else [None]:
                    filled = text.replace("{token}", identifier).replace("[V]", identifier)
                    texts.add(filled.replace("{class}", cls) if cls else filled)
        else:
            with open(file, newline="", encoding="utf-8-sig") as handle:
                texts.update(" ".join(row) for row in csv.reader(handle, delimiter="\t"))
    return sorted(texts)


def merge_configs(config: dict, layer: dict) -> dict:
    """`layer` over `config`, key by key into nested mappings, as Snakemake merges the files
    of `--configfile a.yaml b.yaml` (the later wins); returns `config`, updated in place."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge_configs(config[key], value)
        else:
            config[key] = value
    return config


def check_files(config_paths: list[str | Path], base_dir: str | Path = ".") -> dict:
    """Check config files, merged in order as `snakemake --configfile` merges them, and the
    subjects table and prompts they name (relative to `base_dir`, the workflow's working
    directory), as the workflow does at start-up, with the file, line and column of a YAML
    syntax error (Snakemake itself only says that a config file "is not valid JSON or
    YAML")."""
    from sidpipe.prompts import load_prompts

    config: dict = {}
    for path in config_paths:
        try:
            layer = read_yaml(path, "config file", refuse_leading_zeros=True)
        except SidpipeError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(layer, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        merge_configs(config, layer)
    validate_config(config, ", ".join(map(str, config_paths)))
    check_model_folders(config, ", ".join(map(str, config_paths)), base_dir)
    subjects = load_subjects(Path(base_dir) / config["subjects"], config, base_dir=base_dir)
    load_prompts(
        Path(base_dir) / config["prompts"],
        config,
        {row["kind"] for row in subjects},
        {row["concept"] for row in subjects if row.get("concept")},
    )
    return config


def main(argv: list[str] | None = None) -> int:
    """`python -m sidpipe.config [--directory DIR] [CONFIG ...]`: check config files as one run
    would see them; prints the problem, exit status 1 if there is one."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m sidpipe.config",
        description="Check config files as `snakemake --configfile CONFIG ... --directory DIR` "
        "would load them: YAML syntax (file, line and column), the schema, the subjects table "
        "and the prompts.",
    )
    parser.add_argument(
        "configs",
        nargs="*",
        default=["config.yaml"],
        metavar="CONFIG",
        help="config files, later ones over earlier ones as Snakemake merges them, after "
        "DIR/config.yaml where there is one (the Snakefile's configfile; default: config.yaml); "
        "e.g. demo/config.yaml demo/biases.yaml",
    )
    parser.add_argument(
        "-d",
        "--directory",
        default=".",
        help="the workflow's working directory (Snakemake's --directory), against which the "
        "config's relative paths (subjects table, prompts, image folders) are read; "
        "default: the current one",
    )
    args = parser.parse_args(argv)
    configs = list(args.configs)
    # The Snakefile's `configfile: "config.yaml"`: Snakemake loads the working directory's
    # config.yaml (where there is one) before the --configfile files.
    base = Path(args.directory) / "config.yaml"
    if base.is_file() and base.resolve() not in {Path(c).resolve() for c in configs}:
        configs.insert(0, str(base))
        print(f"{base} first, as the Snakefile's configfile (Snakemake loads it before these)")
    try:
        check_files(configs, args.directory)
    except SidpipeError as err:
        print(err, file=sys.stderr)
        elsewhere = {Path(c).resolve().parent for c in configs}
        if elsewhere != {Path(args.directory).resolve()}:
            print(
                f"(the config's relative paths were read from {Path(args.directory).resolve()}; "
                "if the workflow runs elsewhere, pass its working directory as --directory)",
                file=sys.stderr,
            )
        return 1
    print(f"{', '.join(configs)}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
