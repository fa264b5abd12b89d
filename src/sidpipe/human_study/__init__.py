"""The human study of the paper (App. B, Table B.2): pairs of images of two arms with the same
prompt and seed, judged by participants on four questions.

- `design`: the paper's defaults and the seeded, balanced plan (who sees what, left or right);
- `build`: the study's site from the arms' samples and the subjects' references;
- `responses`: the participants' judgements, one JSON line each, appended durably;
- `server`: the web page participants use (Flask, served by waitress; `sidpipe study serve`);
- `agreement`, `analysis`: Table B.2 with bootstrap intervals, inter-rater agreement, the
  per-subject breakdown and the human preference against the metrics' direction.

Nothing here imports torch or diffusers.
"""
