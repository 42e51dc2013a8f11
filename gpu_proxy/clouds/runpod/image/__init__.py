"""``gpu-proxy image check IMAGE``: does a node image run home's versions? Answered before any pod is paid for.

Three ways, tried in order, each saying what it could not do:

1. :mod:`.engine`: a ``docker``/``podman`` here that has the image already (it is never pulled) runs
   the version probe inside it: the versions really installed, for any image.
2. :mod:`.registry`: the image's labels, read from its registry (the manifest and the small config
   blob; no layer is downloaded). An image built from ``cluster_image/Dockerfile`` carries one label
   per compared package (:mod:`.labels`), checked against what it installed when it was built.
3. Neither: the report says which versions could not be checked, and why.

:mod:`.check` compares with home and words the report; :mod:`.cli` is the command.
"""
