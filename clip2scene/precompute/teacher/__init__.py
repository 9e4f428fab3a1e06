"""The 2D teacher: a frozen open_clip ViT made dense (MaskCLIP and its variants) and its class
text embeddings; or the simulated teacher of the synthetic samples.

Files: ``config.py`` (`TeacherConfig`, the name -> `DenseVariant` dict `TEACHERS`), ``weights.py``
(weights lookup in local caches and files, model building, the tiny test model), ``text.py``
(prompts -> text embeddings), ``prompts.py`` (prompt templates), ``maskclip.py`` (the dense model
`MaskCLIP` and `load_teacher`), ``refine.py`` (key smoothing, prompt denoising, PAMR),
``precision.py`` (compute precision), ``simulated.py`` + ``classmaps.py`` (the simulated teacher).
"""
