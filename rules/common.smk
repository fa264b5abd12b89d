# Validation, tables, wildcard constraints and input functions shared by every stage.
import json
import os
import re
from pathlib import Path

from sidpipe.config import (
    ConfigError,
    check_config_files,
    check_mask_models,
    check_model_folders,
    load_subjects,
    tiny_model_keys,
    validate_config,
)
from sidpipe.job_resources import attempt_scaled, warn_over_cap
from sidpipe.grid import (
    OPT_IN_KINDS,
    all_arm_subjects,
    check_comparisons,
    check_concept_pairs,
    concept_context_words,
    lego_without_context_words,
    unmatched_concept_words,
    subjects_by_arm,
    expand_experiments,
)
from sidpipe.prompts import (
    load_prompts,
    repeated_prompt_warnings,
    subject_templates,
    unmatched_concept_prompts,
)
from sidpipe.references import reference_inputs
from sidpipe.human_study.design import (
    check_recorded_responses,
    plan_settings,
    resolve_settings,
)
from sidpipe.hub import (
    encoder_hub_ids,
    hub_models,
    is_hub_id,
    manual_files,
    record_name,
    record_path,
    repo_id_of,
)
from sidpipe.io import SidpipeError, expand_home
from sidpipe.encoders import (
    BASE_MODEL_ALGORITHM,
    ELITE_MAPPERS_SOURCE,
    ENCODER_ALGORITHMS,
    UNTRAINED_ALGORITHMS,
)
from sidpipe.subsets import split_name
from snakemake.logging import logger

SCHEMA_DIR = Path(workflow.basedir) / "rules" / "schemas"
CONFIG_SOURCE = ", ".join(map(str, workflow.overwrite_configfiles)) or "config.yaml"

check_config_files(workflow.configfiles)
validate_config(config, CONFIG_SOURCE, SCHEMA_DIR)
check_model_folders(config, CONFIG_SOURCE)
SUBJECTS = {
    row["subject"]: row
    for row in load_subjects(config["subjects"], config, schema_dir=SCHEMA_DIR)
}
PROMPTS = load_prompts(
    config["prompts"],
    config,
    {row["kind"] for row in SUBJECTS.values()},
    {row["concept"] for row in SUBJECTS.values() if row.get("concept")},
)
SUBJECT_KINDS = {name: row["kind"] for name, row in SUBJECTS.items()}
EXPERIMENTS = expand_experiments(config, list(SUBJECTS), SUBJECT_KINDS)
ARM_SUBJECTS = all_arm_subjects(config, list(SUBJECTS), SUBJECT_KINDS)
if not ARM_SUBJECTS:
    raise ConfigError(
        f"{CONFIG_SOURCE}: experiments: no grid runs on any subject of {config['subjects']} "
        f"(kinds there: {', '.join(sorted(set(SUBJECT_KINDS.values())))}); give a grid "
        "`subjects:` or `kinds:` that the table has (concept subjects need `kinds: [concept]`)"
    )
check_concept_pairs(
    config, EXPERIMENTS, SUBJECT_KINDS, ENCODER_ALGORITHMS, CONFIG_SOURCE
)
_unmatched = unmatched_concept_words(config, SUBJECTS)
if _unmatched:
    logger.warning(
        f"concept_words for no subject's concept: {', '.join(_unmatched)} (the subjects "
        "table's `concept` column must spell the concept the same way)"
    )
_unmatched = unmatched_concept_prompts(
    config["prompts"],
    {row["concept"] for row in SUBJECTS.values() if row.get("concept")},
)
if _unmatched:
    logger.warning(
        f"{config['prompts']}: concepts: list(s) for no subject's concept: "
        f"{', '.join(_unmatched)} (those subjects get their kind's list; the subjects table's "
        "`concept` column must spell the concept the same way)"
    )
for _warning in lego_without_context_words(config, SUBJECTS, ARM_SUBJECTS):
    logger.warning(_warning)
for _warning in repeated_prompt_warnings(
    PROMPTS, SUBJECTS, {subject for _, subject in ARM_SUBJECTS}, config["prompts"]
):
    logger.warning(_warning)
_idle = sorted(set(SUBJECTS) - {subject for _, subject in ARM_SUBJECTS})
if _idle:
    logger.warning(
        f"subject(s) in no experiment (references and masks only): {', '.join(_idle)}; "
        "a concept subject runs only in grids with `kinds: [concept]` or that name it"
    )
COMPARISONS, _skipped = check_comparisons(
    config["metrics"].get("comparisons", []), ARM_SUBJECTS, CONFIG_SOURCE
)
for _warning in _skipped:
    logger.warning(_warning)
DATASETS = sorted({row["source"] for row in SUBJECTS.values()} - {"local"})
TINY_MODELS = tiny_model_keys(config)
# hub id -> the config keys that name it (rule fetch_model)
HUB_MODELS = hub_models(config)
# Files a user downloads by hand (ELITE's mappers): the config key that names each -> its path
MANUAL_FILES = manual_files(config)
# Cluster jobs load hub models from the cache fetch_model filled on the submitting host and do
# not ask the hub (compute nodes often have no internet; each question is a timeout there).
if workflow.remote_exec:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The conda envs' post-deploy step installs this checkout, wherever `--directory` runs the
# workflow (envs/*.post-deploy.sh).
os.environ.update(SIDPIPE_CHECKOUT=str(Path(workflow.basedir)))
# Jobs in a conda env would otherwise import a researcher's `pip install --user` packages
# (~/.local) before the env's pinned ones (a virtualenv leaves them out already).
os.environ.update(PYTHONNOUSERSITE="1")

NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"
NEVER = "(?!x)x"  # a regex that matches nothing, for an empty alternative


def job_memory(rule_name, default_mb):
    """A job's mem_mb, config `job_resources` first; a retry asks for more. Named when the
    run's global mem_mb would lower it."""
    return memory_checked(
        attempt_scaled(config, rule_name, "mem_mb", default_mb), rule_name
    )


def memory_checked(resource, rule_name):
    """`resource`, warning once when it asks for more than the run's global mem_mb (profile or
    --resources), to which Snakemake would lower it."""
    cap = getattr(workflow.global_resources.get("mem_mb"), "value", None)
    cap = cap if isinstance(cap, int) else None
    return warn_over_cap(resource, rule_name, "mem_mb", cap, logger.warning)


def job_runtime(rule_name, default_minutes):
    """A job's runtime (minutes), config `job_resources` first; a retry asks for more."""
    return attempt_scaled(config, rule_name, "runtime", default_minutes)


def class_slug(class_name):
    """Path-safe form of a class noun ("toy car" -> "toy_car")."""
    return class_name.replace(" ", "_")


CLASSES = {class_slug(row["class"]): row["class"] for row in SUBJECTS.values()}
# Encoder-based methods (BLIP-Diffusion, ELITE) and the base model have no training job: the
# reference goes in at sampling time, or none at all (rule sample_encoder).
UNTRAINED = sorted(
    {
        arm.method
        for arm, _ in ARM_SUBJECTS
        if config["methods"][split_name(arm.method)[0]]["algorithm"]
        in UNTRAINED_ALGORITHMS
    }
)
UNTRAINED_METHODS = "|".join(map(re.escape, UNTRAINED)) or NEVER
TRAINED = sorted(
    {
        (arm.method, arm.descriptions, subject)
        for arm, subject in ARM_SUBJECTS
        if arm.method not in UNTRAINED
    }
)
FULL_FINETUNE = sorted(
    {
        m
        for m, _, _ in TRAINED
        if config["methods"][split_name(m)[0]]["algorithm"] == "dreambooth"
    }
)
ADAPTER = sorted({m for m, _, _ in TRAINED} - set(FULL_FINETUNE))
FULL_FINETUNE_METHODS = "|".join(FULL_FINETUNE) or NEVER
ADAPTER_METHODS = "|".join(ADAPTER) or NEVER

logger.info(
    f"Experiment grid: {len(ARM_SUBJECTS)} arm x subject pairs, "
    f"{len({arm for arm, _ in ARM_SUBJECTS})} arms, {len(SUBJECTS)} subjects"
)
for _experiment, _pairs in EXPERIMENTS.items():
    _arms = sorted({arm.name for arm, _ in _pairs})
    logger.info(f"  {_experiment}: {', '.join(_arms)}")


def human_study_settings():
    """The `human_study` section over the paper's defaults, checked against the grid and
    the judgements already recorded (sidpipe.human_study.design); None without one."""
    if "human_study" not in config:
        return None
    where = f"{CONFIG_SOURCE}: human_study"
    try:
        settings = resolve_settings(
            config["human_study"],
            subjects_by_arm(ARM_SUBJECTS),
            list(SUBJECTS),
            config["sampling"]["prompts_per_subject"],
            config["sampling"]["seeds"],
            where,
        )
        warning = check_recorded_responses(settings, where)
    except SidpipeError as err:
        raise ConfigError(str(err)) from None
    if warning:
        logger.warning(warning)
    return settings


HUMAN_STUDY = human_study_settings()


wildcard_constraints:
    subject="|".join(SUBJECTS),
    dataset=NAME,
    method=NAME,
    descriptions=NAME,
    inference=NAME,
    class_slug="|".join(CLASSES),
    repo="|".join(re.escape(record_name(repo_id)) for repo_id in HUB_MODELS) or NEVER,
    manual_key="|".join(map(re.escape, MANUAL_FILES)) or NEVER,
    study=re.escape(HUMAN_STUDY["name"]) if HUMAN_STUDY else NEVER,


def subject_images(wildcards):
    """Reference files of a subject: listed one by one for local folders (so editing one image
    reruns its subject), the dataset manifest for downloaded ones."""
    row = SUBJECTS[wildcards.subject]
    if row["source"] != "local":
        return [f"resources/{row['source']}.manifest.csv"]
    # images and everything named like a mask (a misnamed mask is reported by the job)
    return [str(p) for p in reference_inputs(Path(row["images"]))]


def model_input(key):
    """What a job loading `models.<key>` waits for: the tiny models' folder the workflow builds,
    or a hub model's fetch record, else nothing (a local folder)."""
    return (
        "results/models/tiny"
        if key in TINY_MODELS
        else hub_input(config["models"].get(key))
    )


def hub_input(model):
    """The fetch record of a hub id (ancient: fetching again reruns no job), else nothing."""
    return ancient(record_path(model)) if is_hub_id(model) else []


def hub_model_users(wildcards):
    return HUB_MODELS[repo_id_of(wildcards.repo)]


def manual_file_settings(wildcards):
    """Arguments of sidpipe.hub.check_manual_file besides the record's path."""
    return {
        "path": MANUAL_FILES[wildcards.manual_key],
        "key": wildcards.manual_key,
        "source": ELITE_MAPPERS_SOURCE,
    }


def mask_backend(subject):
    return SUBJECTS[subject].get("mask_backend") or config.get("segmentation", {}).get(
        "backend", "grounded_sam"
    )


def mask_model_inputs(wildcards):
    """Grounded-SAM needs the detector and segmenter (built first when they are tiny)."""
    if mask_backend(wildcards.subject) != "grounded_sam":
        return []
    return [
        path for key in ("grounding_dino", "sam") for path in [model_input(key)] if path
    ]


def segmentation_settings(wildcards):
    """Arguments of sidpipe.masks.segment_references: config defaults + subject overrides."""
    row = SUBJECTS[wildcards.subject]
    settings = dict(config.get("segmentation", {}))
    settings.pop("backend", None)
    settings.update(
        backend=mask_backend(wildcards.subject),
        class_name=row["class"],
        text_prompt=row.get("text_prompt") or None,
        detector=config["models"].get("grounding_dino"),
        segmenter=config["models"].get("sam"),
    )
    if row.get("box_threshold"):
        settings["box_threshold"] = float(row["box_threshold"])
    return settings


def vlm_entry(descriptions):
    """The VLM entry of a description set, with its name; None for Case 1."""
    name = config["descriptions"][descriptions].get("vlm")
    return {"name": name, **config["vlms"][name]} if name else None


def vlm_backend(descriptions):
    entry = vlm_entry(descriptions)
    return entry["backend"] if entry else "template"


# Description sets an API writes (the OpenAI backend) are described on the submitting host
# (describe_references_api, a local rule): an HTTPS call per image, which compute nodes often
# cannot make. The other sets' jobs go to the cluster (describe_references).
API_DESCRIPTIONS = [
    name for name in config["descriptions"] if vlm_backend(name) == "openai"
]
API_DESCRIPTION_SETS = "|".join(map(re.escape, API_DESCRIPTIONS)) or NEVER
NODE_DESCRIPTION_SETS = (
    "|".join(
        re.escape(name)
        for name in config["descriptions"]
        if name not in API_DESCRIPTIONS
    )
    or NEVER
)


def local_vlm_memory(wildcards):
    """A VLM run on the node (LLaVA, BLIP-2) needs its weights in memory; an API call does not."""
    return 40000 if vlm_backend(wildcards.descriptions) == "transformers" else 2000


def manual_descriptions_file(subject, descriptions):
    """Hand-written descriptions next to a local subject's images (they override any VLM)."""
    row = SUBJECTS[subject]
    if row["source"] != "local":
        return None
    entry = vlm_entry(descriptions)
    name = (
        entry["model"]
        if entry and entry["backend"] == "manual"
        else "descriptions.yaml"
    )
    path = Path(row["images"]) / name
    return (
        str(path) if path.exists() or (entry and entry["backend"] == "manual") else None
    )


def manual_descriptions_input(wildcards):
    path = manual_descriptions_file(wildcards.subject, wildcards.descriptions)
    return [path] if path else []


def vlm_model_input(wildcards):
    """A local VLM folder (`~` expanded, as the loader does) is an input: new weights rerun."""
    entry = vlm_entry(wildcards.descriptions)
    if entry and entry["backend"] == "transformers":
        folder = expand_home(entry["model"])
        if Path(folder).exists():
            return [folder]
        return hub_input(entry["model"])
    return []


def description_settings(wildcards):
    """Arguments of sidpipe.descriptions.stage.describe_references (no secrets: only env var names)."""
    row = SUBJECTS[wildcards.subject]
    entry = config["descriptions"][wildcards.descriptions]
    limits = config.get("description_limits", {})
    return {
        "class_name": row["class"],
        "kind": row["kind"],
        "case": entry["case"],
        "vlm": vlm_entry(wildcards.descriptions),
        "tokenizer": config["models"]["base"],
        "style": entry.get("style", False),
        "expression": entry.get("expression", False),
        "manual_file": manual_descriptions_file(
            wildcards.subject, wildcards.descriptions
        ),
        "max_text_tokens": limits.get("max_text_tokens", 77),
        "max_attempts": limits.get("max_attempts", 3),
        "identifier": config["identifier"],
    }


def description_sets_of(subject):
    """Description sets a subject's arms train on, plus those their negative prompts use."""
    sets = set()
    for arm, arm_subject in ARM_SUBJECTS:
        if arm_subject == subject:
            sets.add(arm.descriptions)
            negative = config["inference"][arm.inference].get("negative_prompt_from")
            if negative:
                sets.add(negative)
    return sorted(sets)


def class_image_settings(wildcards):
    """Arguments of sidpipe.class_images.generate_class_images."""
    settings = dict(config.get("class_images", {"count": 200}))
    settings.update(
        base_model=config["models"]["base"],
        class_name=CLASSES[wildcards.class_slug],
        resolution=config["references"]["resolution"],
    )
    return settings


def method_settings(method):
    """A method's config entry; a reference-subset method (`dreambooth--first1`) has its
    base method's."""
    return config["methods"][split_name(method)[0]]


def reference_subset(method):
    """The part of the references a method trains and is scored on (None: all of them)."""
    return split_name(method)[1]


def training_inputs(wildcards):
    """References, this arm's descriptions, and class images / masks when the method uses them."""
    settings = method_settings(wildcards.method)
    inputs = {
        "references": f"results/references/{wildcards.subject}/manifest.csv",
        "descriptions": f"results/descriptions/{wildcards.descriptions}/{wildcards.subject}.csv",
        "model": model_input("base"),
    }
    if settings.get("prior_preservation"):
        slug = class_slug(SUBJECTS[wildcards.subject]["class"])
        inputs["class_images"] = f"results/class_images/{slug}/manifest.csv"
    if settings.get("masked"):
        inputs["masks"] = f"results/masks/{wildcards.subject}/manifest.csv"
    return inputs


def training_settings(wildcards):
    """Arguments of sidpipe.training.loop.train_subject (except paths)."""
    row = SUBJECTS[wildcards.subject]
    settings = concept_context_words(
        method_settings(wildcards.method),
        row.get("concept"),
        config.get("concept_words"),
    )
    training = config.get("training", {})
    subset = reference_subset(wildcards.method)
    return {
        "algorithm": settings["algorithm"],
        # only for reference-subset methods: other arms' params (and results) stay as they were
        **({"reference_subset": subset} if subset is not None else {}),
        "settings": {
            k: v
            for k, v in settings.items()
            if k not in ("algorithm", "checkpoint_every", "seed")
        },
        "base_model": config["models"]["base"],
        "identifier": config["identifier"],
        "class_name": SUBJECTS[wildcards.subject]["class"],
        # a method's own seed: the same method trained from another seed is another arm
        "seed": settings.get("seed", training.get("seed", 0)),
        "mixed_precision": training.get("mixed_precision", "no"),
        "checkpoint_every": settings.get(
            "checkpoint_every", training.get("checkpoint_every", 100)
        ),
        "gradient_checkpointing": training.get("gradient_checkpointing", False),
        "use_8bit_adam": training.get("use_8bit_adam", False),
    }


def weights_output_flag(path):
    """temp() for full fine-tunes unless training.keep_full_weights is true."""
    return (
        path
        if config.get("training", {}).get("keep_full_weights", True)
        else temp(path)
    )


def negative_prompt_source(inference):
    return config["inference"][inference].get("negative_prompt_from")


def sample_inputs(wildcards):
    """The arm's trained weights (+ the descriptions its negative prompt comes from)."""
    run = (
        f"results/train/{wildcards.method}/{wildcards.descriptions}/{wildcards.subject}"
    )
    inputs = {
        "weights": f"{run}/weights",
        "info": f"{run}/train_info.json",
        "model": model_input("base"),
    }
    negative = negative_prompt_source(wildcards.inference)
    if negative:
        inputs["negative"] = f"results/descriptions/{negative}/{wildcards.subject}.csv"
    return inputs


def sample_settings(wildcards):
    """Arguments of sidpipe.sampling.sample_arm besides paths and the arm's token."""
    sampling = config["sampling"]
    row = SUBJECTS[wildcards.subject]
    return {
        "base_model": config["models"]["base"],
        "algorithm": method_settings(wildcards.method)["algorithm"],
        "templates": subject_templates(PROMPTS, row),
        "class_name": row["class"],
        # only for concept subjects: other jobs' params (and so their results) stay as they were
        **({"concept": row["concept"]} if row.get("concept") else {}),
        "seeds": list(range(sampling["seeds"])),
        "steps": sampling["steps"],
        "guidance_scale": sampling["guidance_scale"],
        "resolution": sampling["resolution"],
        "batch_size": sampling.get("batch_size", 10),
        "dtype": sampling.get("dtype", "float16"),
    }


def attention_inputs(wildcards):
    """Those of sample, plus the detector and segmenter for the generated images' masks."""
    inputs = sample_inputs(wildcards)
    inputs["detector"] = model_input("grounding_dino")
    inputs["segmenter"] = model_input("sam")
    return {key: value for key, value in inputs.items() if value}


def attention_settings(wildcards):
    """Arguments of sidpipe.attention.attention_for_arm besides paths, prompts and the arm's
    token; sample_and_attention jobs draw them with the pipeline they sampled with."""
    settings = sample_settings(wildcards)
    attention = config.get("attention", {"prompt_ids": [0], "seeds": [0]})
    settings.pop("batch_size")
    settings.pop("templates")  # the prompts are expanded once, for both stages
    settings.pop("concept", None)
    settings.update(
        seeds=attention["seeds"],
        prompt_ids=attention["prompt_ids"],
        steps=attention.get("steps", settings["steps"]),
        detector=config["models"].get("grounding_dino"),
        segmenter=config["models"].get("sam"),
        # masks of generated images: Grounded-SAM, or the synthetic world's judge
        judge=(
            config["models"].get("judge") if attention.get("masks") == "judge" else None
        ),
        # The subject's own grounding prompt and threshold, as for its references.
        segmentation={
            k: v
            for k, v in segmentation_settings(wildcards).items()
            if k
            in (
                "box_threshold",
                "text_threshold",
                "box_mode",
                "fill_holes",
                "largest_component",
                "text_prompt",
            )
        },
    )
    return settings


def attention_pairs():
    """(arm, subject) pairs that get attention maps: those of `attention.experiments` (all)."""
    chosen = config.get("attention", {}).get("experiments") or list(EXPERIMENTS)
    # An untrained arm has no [V] token to map; a concept subject's prompts name other classes,
    # which the subject mask (found by the carrier's class) would miss.
    return sorted(
        {
            pair
            for name in chosen
            for pair in EXPERIMENTS[name]
            if pair[0].method not in UNTRAINED
            and SUBJECT_KINDS[pair[1]] not in OPT_IN_KINDS
        }
    )


# Checked at load: a missing detector or judge would otherwise fail deep inside a job.
check_mask_models(
    config,
    {subject: mask_backend(subject) for subject in SUBJECTS},
    bool(attention_pairs()),
    CONFIG_SOURCE,
)


# Arms with attention maps are sampled and mapped by one job (sample_and_attention), which
# loads the arm's pipeline once for both; the other arms only sample (sample). The path decides
# which of the two makes a samples folder, by a lookahead on `method` that matches
# "method/descriptions/inference/subject/" against the mapped pairs; so every folder has
# exactly one producer.
def attention_arms_constraint(mapped):
    """Regex for `method`: only mapped (arm, subject) paths (mapped=True) or only the others."""
    pairs = "|".join(
        re.escape(f"{arm.name}/{subject}") for arm, subject in attention_pairs()
    )
    # the untrained arms are sampled by sample_encoder
    not_untrained = f"(?!(?:{UNTRAINED_METHODS})/)"
    if not pairs:
        return NEVER if mapped else not_untrained + NAME
    if mapped:
        return f"(?=(?:{pairs})/){NAME}"
    return f"(?!(?:{pairs})/){not_untrained}{NAME}"


def sample_and_attention_resource(key, sample_default, attention_default, combine):
    """One job does both stages: memory is the larger of the two (the pipeline is released
    before GroundingDINO and SAM load), runtime the sum (`job_resources` of either rule).
    """
    stages = [
        attempt_scaled(config, "sample", key, sample_default),
        attempt_scaled(config, "attention_maps", key, attention_default),
    ]

    def resource(wildcards, attempt):
        return combine(stage(wildcards, attempt) for stage in stages)

    return (
        memory_checked(resource, "sample_and_attention")
        if key == "mem_mb"
        else resource
    )


def tiny_encoder_input(settings):
    """The tiny encoder models' folder when a method's checkpoints point into it (demo)."""
    values = [str(v) for v in settings.values()]
    return (
        ["results/models/tiny_encoders"]
        if any(v.startswith("results/models/tiny_encoders/") for v in values)
        else []
    )


def sample_encoder_inputs(wildcards):
    """An encoder arm reads the subject's references (and masks: ELITE) and its checkpoints;
    the base model arm only the base model."""
    settings = method_settings(wildcards.method)
    if settings["algorithm"] == BASE_MODEL_ALGORITHM:
        inputs = {"models": model_input("base")}
    else:
        inputs = {
            "references": f"results/references/{wildcards.subject}/manifest.csv",
            "models": tiny_encoder_input(settings),
        }
    if settings["algorithm"] == "elite":
        inputs["masks"] = f"results/masks/{wildcards.subject}/manifest.csv"
        # downloaded by hand (not on the hub): a missing one is named before any job runs
        inputs["mappers"] = [
            ancient(f"results/models/manual/{key}.json")
            for key in MANUAL_FILES
            if key.startswith(f"methods.{split_name(wildcards.method)[0]}.")
        ]
    inputs["hub"] = [
        hub_input(repo_id)
        for repo_id in encoder_hub_ids(settings["algorithm"], settings).values()
    ]
    return {key: value for key, value in inputs.items() if value}


def sample_encoder_settings(wildcards):
    """Arguments of sidpipe.encoders.sampling.sample_encoder_arm besides paths."""
    settings = sample_settings(wildcards)
    method = method_settings(wildcards.method)
    # the base model arm samples the pipeline every trained arm starts from
    if method["algorithm"] == BASE_MODEL_ALGORITHM:
        method = {**method, "model": settings["base_model"]}
    return {
        "algorithm": method["algorithm"],
        "settings": {k: v for k, v in method.items() if k != "algorithm"},
        "reference_subset": reference_subset(wildcards.method),
        # a concept subject's (the base model's floor for Lego): its words in the prompts
        **({"concept": settings["concept"]} if "concept" in settings else {}),
        **{
            key: settings[key]
            for key in (
                "templates",
                "class_name",
                "seeds",
                "steps",
                "guidance_scale",
                "resolution",
                "batch_size",
                "dtype",
            )
        },
    }


def compared_methods():
    """(method, subject) pairs that have both a baseline (case1) and a SID arm."""
    arms = {(arm.method, arm.descriptions, arm.inference, s) for arm, s in ARM_SUBJECTS}
    return sorted(
        {
            (m, s)
            for m, d, i, s in arms
            if d == "case1" and i == "standard" and (m, "sid", "standard", s) in arms
        }
    )


def score_inputs(wildcards):
    inputs = {
        "samples": f"results/samples/{wildcards.method}/{wildcards.descriptions}/"
        f"{wildcards.inference}/{wildcards.subject}/manifest.csv",
        "masks": f"results/masks/{wildcards.subject}/manifest.csv",
        "references": f"results/references/{wildcards.subject}/manifest.csv",
        "clip": model_input("clip"),
        "dino": model_input("dino"),
        "truth": world_truth(wildcards.subject),
    }
    return {key: value for key, value in inputs.items() if value}


def world_truth(subject):
    """A world subject's truth.json when the world's judge is configured (the ground-truth
    leak measures), else nothing."""
    row = SUBJECTS[subject]
    path = Path(row["images"]) / "truth.json"
    if config["models"].get("judge") and row["source"] == "local" and path.exists():
        return str(path)
    return []


def tokenizer_corpus_files():
    """Texts the tiny tokenizer learns from: the prompts and the subjects' descriptions."""
    files = [config["prompts"], config["subjects"]]
    for row in SUBJECTS.values():
        candidate = Path(row["images"]) / "descriptions.yaml"
        if row["source"] == "local" and candidate.exists():
            files.append(str(candidate))
    return files


def arms_table_rows():
    """One row per experiment, arm and subject: the grid the later stages run."""
    return [
        {
            "experiment": experiment,
            "arm": arm.name,
            "method": arm.method,
            "algorithm": method_settings(arm.method)["algorithm"],
            "references": reference_subset(arm.method) or "all",
            "descriptions": arm.descriptions,
            "inference": arm.inference,
            "subject": subject,
            "class": row["class"],
            "kind": row["kind"],
            "method_settings": json.dumps(method_settings(arm.method), sort_keys=True),
        }
        for experiment, pairs in EXPERIMENTS.items()
        for arm, subject in pairs
        for row in [SUBJECTS[subject]]
    ]


def human_study_inputs(wildcards):
    """Both arms' samples of every study subject (subject by subject, arm A then B) and the
    subjects' references."""
    return {
        "samples": [
            f"results/samples/{arm}/{subject}/manifest.csv"
            for subject in HUMAN_STUDY["subjects"]
            for arm in HUMAN_STUDY["arms"]
        ],
        "references": [
            f"results/references/{subject}/manifest.csv"
            for subject in HUMAN_STUDY["subjects"]
        ],
    }


def human_study_build_settings(wildcards):
    """Arguments of sidpipe.human_study.build.build_study besides paths."""
    return plan_settings(HUMAN_STUDY)


def human_study_analysis_settings(wildcards):
    """Arguments of sidpipe.human_study.analysis.analyze_study besides paths."""
    return {"n_boot": HUMAN_STUDY["bootstrap"], "seed": HUMAN_STUDY["seed"]}


def human_study_responses(wildcards):
    """The participants' responses (written by `sidpipe study serve`, never by a rule)."""
    return HUMAN_STUDY["responses"]


def human_study_targets():
    """The study's site; its analysis too once participants have answered."""
    if not HUMAN_STUDY:
        return []
    study = f"results/human_study/{HUMAN_STUDY['name']}"
    targets = [f"{study}/site", f"{study}/design.csv"]
    if Path(HUMAN_STUDY["responses"]).exists():
        targets += [f"{study}/table_b2.csv", f"{study}/plots/human_study.png"]
    return targets


def all_targets():
    targets = [
        "results/references/summary.csv",
        *expand("results/masks/{subject}/manifest.csv", subject=SUBJECTS),
        *expand("results/descriptions/report/{subject}.html", subject=SUBJECTS),
        "results/experiments/arms.csv",
    ]
    targets += [
        f"results/samples/{arm.name}/{subject}/manifest.csv"
        for arm, subject in ARM_SUBJECTS
    ]
    targets += [
        f"results/attention/{arm.name}/{subject}/attention.csv"
        for arm, subject in attention_pairs()
    ]
    targets += [f"results/samples/compare/{m}/{s}.png" for m, s in compared_methods()]
    targets.append("results/metrics/summary.csv")
    targets += human_study_targets()
    if TINY_MODELS:
        targets.append("results/models/tiny")
    return targets


# --- small input and params functions of the stage rules ----------------------------------


def base_model_input(wildcards):
    return model_input("base")


def dataset_downloads(wildcards):
    return config["datasets"][wildcards.dataset]["downloads"]


def dataset_timeout(wildcards):
    return config["datasets"][wildcards.dataset].get("timeout", 120)


def subject_images_folder(wildcards):
    return SUBJECTS[wildcards.subject]["images"]


def subject_table_rows():
    """The subjects table's columns the references summary shows."""
    return [
        {k: row[k] for k in ("subject", "class", "kind", "source")}
        for row in SUBJECTS.values()
    ]


def subject_classes():
    return sorted({row["class"] for row in SUBJECTS.values()})


def description_csvs(wildcards):
    """Every description set of a subject, for its descriptions page."""
    return expand(
        "results/descriptions/{descriptions}/{subject}.csv",
        descriptions=description_sets_of(wildcards.subject),
        subject=wildcards.subject,
    )


def compared_prompt_ids(wildcards):
    return list(range(config["sampling"]["prompts_per_subject"]))


def metric_csvs():
    return [
        f"results/metrics/{arm.name}/{subject}.csv" for arm, subject in ARM_SUBJECTS
    ]


def manual_description_sets():
    """Subject -> its description sets of the `manual` backend, for the subjects that run."""
    sets = {}
    for subject in sorted({s for _, s in ARM_SUBJECTS}):
        manual = [d for d in description_sets_of(subject) if vlm_backend(d) == "manual"]
        if manual:
            sets[subject] = manual
    return sets


def missing_manual_descriptions():
    """Hand-written description files (the `manual` backend) the arms need but that are not
    there, path -> (subject, its description sets that read it): named at load, not as a
    missing input."""
    missing = {}
    for subject, sets in manual_description_sets().items():
        for descriptions in sets:
            path = manual_descriptions_file(subject, descriptions)
            if path and not Path(path).exists():
                missing.setdefault(path, (subject, []))[1].append(descriptions)
    return missing


_downloaded_manual = [
    f"{subject} (dataset {SUBJECTS[subject]['source']}; sets {', '.join(sets)})"
    for subject, sets in manual_description_sets().items()
    if SUBJECTS[subject]["source"] != "local"
]
if _downloaded_manual:
    raise ConfigError(
        f"{CONFIG_SOURCE}: description sets of the manual backend read hand-written "
        "descriptions next to a local subject's images, but these subjects are downloaded: "
        + "; ".join(_downloaded_manual)
        + ". Copy the subject's images into a folder of your own (source local in the "
        "subjects table) with its descriptions.yaml, or run it without those sets"
    )
_missing_manual = missing_manual_descriptions()
if _missing_manual:
    raise ConfigError(
        f"{CONFIG_SOURCE}: description sets of the manual backend read hand-written "
        "descriptions next to the images, and "
        + "; ".join(
            f"{path} (subject {subject}, sets {', '.join(sets)}) does not exist"
            for path, (subject, sets) in _missing_manual.items()
        )
        + ": write it (image stem -> case -> text, as demo/subjects/blue_mug/descriptions.yaml)"
        " or run the subject without those sets"
    )
