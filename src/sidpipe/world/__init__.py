"""A synthetic world where the SID effect is real and measurable on a CPU.

Procedural scenes with ground truth (`grammar`, `draw`), a caption writer at the paper's four
detail levels (`captions`), tiny models of the real classes pretrained on the scenes
(`pretrain`: CLIP, VAE, UNet, a DINO-role ViT and a judge), biased personalization subjects
(`subjects`) and ground-truth entanglement measures read by the judge (`measures`).

The stages that train and sample never import this package: they see model folders written
with `save_pretrained`, subject folders and prompt files, exactly as for the real models. The
judge's readers do: `score` and the attention maps load the judge (`judge`) where the config
names one (`models.judge`), and `analyze` always imports the names of its measures
(`measures`), judge or not.
"""
