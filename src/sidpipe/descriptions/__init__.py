"""Stage `describe_references`: one training description per reference image and description set.

Case 1 is the template "a [V] {class}"; Cases 2-4 are written by a vision-language model
(`sidpipe.vlm`) from our instructions (data/instructions.yaml), or taken from a hand-written
file (`<stem>: {case1: ..., case4: ...}`), whose entries override any model. Every description
must contain the literal placeholder "[V]" exactly once, directly before the class noun, and fit
the base model's text encoder; a model whose answer fails either check is asked again with the
reason, a bounded number of times. Answers are normalised (Markdown, labels, wrapping quotes)
and judged as they arrive; accepted answers are cached per exact request (one JSON file each),
so reruns and other description sets that need the same answer send no request, while rejected
answers are only logged, so a rerun asks again for exactly the images still without one.

Modules: `stage` (the job: `describe_references`), `text` (a model's answer as a description:
normalised, checked, fitted to the text encoder), `instructions` (what the model is asked),
`cache` (accepted answers per exact request), `inputs` (the prepared references and a
hand-written descriptions file), `report` (the report's table of every set).
"""
