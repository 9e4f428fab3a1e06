"""Synthetic datasets in the exact on-disk formats (tests, the demo, benchmarks): ``nuscenes.py``
(`make_sample`, the `make-sample` command), ``semantickitti.py``, ``scannet.py``, ``render.py``
(the camera renderer they share) and ``scale.py`` (full-size table sets for scale tests)."""
