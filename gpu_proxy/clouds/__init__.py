"""Clouds that gpu-proxy launches Ray clusters on: one folder per cloud.

Each cloud folder follows the same shape (modelled on SkyPilot's per-cloud provisioners), so adding
a cloud touches one folder:

* ``client.py``: a thin typed client of the cloud's own API (keys, retries, errors that say what to do);
* ``gpu_types.py`` (or ``instance_types.py``): machine/GPU names, prices, ``estimate_cost``;
* ``provision.py``: the few functions every cloud implements: ``run_instances`` (launch),
  ``query_instances``, ``wait_instances``, ``terminate_instances``;
* ``cluster.py``: the :class:`~gpu_proxy.clusters.base.Cluster` that strings them together with the
  cloud-independent pieces (SSH, the node image's entrypoint, the Ray token, the tunnel).
"""
