# sidpipe: Selectively Informative Description (SID) personalization experiments, end to end.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/world.smk"
include: "rules/references.smk"
include: "rules/masks.smk"
include: "rules/descriptions.smk"
include: "rules/training.smk"
include: "rules/sampling.smk"
include: "rules/metrics.smk"
include: "rules/experiments.smk"
include: "rules/human_study.smk"


rule all:
    default_target: True
    input:
        all_targets(),
