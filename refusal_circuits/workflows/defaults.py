"""The commands' own defaults, named once.

The study's defaults are the fields of :class:`refusal_circuits.study.StudyConfig`; where a command's default is the
same idea it is the same constant here (the base language, the false discovery rate, the batch size). Where a command
measures with more than the study affords (the study runs every stage on 14 languages, a command one step), its
default is its own and written down here, so that argparse, the help texts and the workflows read one value.
"""

from __future__ import annotations

#: The prompt set every command and the study read unless told otherwise.
PROMPTS = "bundled"
#: Where the model runs: one device, float32 (what every measurement in the docs uses).
DEVICE = "cpu"
DTYPE = "float32"
#: The language the others are compared with, and whose direction the study selects.
BASE_LANG = "en"
#: Prompts per forward pass and per generation batch.
BATCH_SIZE = 32
#: False discovery rate across heads in the paired comparison.
ALPHA = 0.05
#: At most this many prompts of each language and label that refusal tokens are discovered on.
DISCOVERY_PROMPTS = 32
#: The seed of every capped subset (``--max-prompts``, the discovery prompts): a sample stratified by category
#: (:meth:`~refusal_circuits.data.PromptSet.sample`), the same prompts in every language.
SAMPLE_SEED = 0

#: ``directions``: the selection filter (Arditi's, falling back to PolyRefuse's).
DIRECTIONS_FILTER = "auto"
#: ``evaluate``: tokens generated per prompt.
EVALUATE_NEW_TOKENS = 32
#: ``attribute``: prompts per forward pass (attribution keeps every head's write per position).
ATTRIBUTE_BATCH_SIZE = 16
#: ``attribute``: heads whose total effect is measured by patching.
ATTRIBUTE_TOTAL_EFFECTS = 8
#: ``compare``: heads patched from the base run into each translation.
COMPARE_PATCH_TOP_K = 5
#: ``compare`` without ``--evaluation``: tokens of the greedy generation that gives the baseline refusal rates.
COMPARE_BASELINE_NEW_TOKENS = 24
#: ``harm``: at most this many train prompts per language and label for the harm and refusal directions (the
#: study's per-language directions use the same number).
HARM_FIT_PROMPTS = 64
#: ``harm``: prompts per forward pass (the per-head attribution keeps every head's write per position).
HARM_BATCH_SIZE = 16
#: ``harm``: bootstrap resamples behind every interval.
HARM_N_BOOT = 1000
#: ``subspace``: the refusal subspaces' dimension (Wollschläger et al. find cones of a few dimensions).
SUBSPACE_K = 3
