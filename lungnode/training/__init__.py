"""Training: how the model the node runs is made (transfer learning, evaluation, export).

Modules: :mod:`.lesions` (real MosMed lesion shapes), :mod:`.phantom` (CT phantom generator),
:mod:`.cases` (in-memory cases, cache, phantom sets), :mod:`.datasets` (COVID-19-CT-Seg, MosMed,
NIfTI, DICOM SEG loaders; splits), :mod:`.ricord` (RICORD MD.ai JSON → masks), :mod:`.recipe`
(TOML run description), :mod:`.augment` (device-side sampling + augmentation), :mod:`.trainer`
(the loop), :mod:`.metrics` and :mod:`.evaluate` (paper protocol), :mod:`.export` (bundle),
:mod:`.pretrain` (Med3D-style encoder pretraining), :mod:`.cli` (commands). Importing this package
imports nothing heavy.
"""
