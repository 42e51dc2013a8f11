"""A gpu-proxy node on RunPod: start sshd with the given key, wait for the Ray token, then a Ray head
or worker, and (with ``IDLE_TIMEOUT_S``) end the pod when nobody uses it. The node image's
entrypoint (``cluster_image/entrypoint.py``) runs it, and so does a pod started from a stock image
once home has installed gpu-proxy there (``python -m gpu_proxy.clouds.runpod.node``).

Modules: :mod:`.config` (the environment below, every problem listed at once), :mod:`.runpod_env`
(what RunPod sets: Instant Cluster ranks, private names, the pod-scoped key), :mod:`.sshd`,
:mod:`.pod_self` (a pod ending itself through :class:`~gpu_proxy.clouds.runpod.client.RunPodClient`),
:mod:`.idle_watch`, :mod:`.main` (the main loop).

Configuration comes from environment variables (the way RunPod and Docker pass it):

==========================  =============================================================
``ROLE``                    ``head`` or ``worker`` (required)
``PRIVATE_IP``              the node's private IP, where Ray listens. Default for a head:
                            ``127.0.0.1`` (a single-node cluster, every Ray port on loopback);
                            required for a worker, and for a head that workers join.
                            ``auto``: learn it: on a RunPod pod with global networking, the
                            address of ``$RUNPOD_POD_ID.runpod.internal``; in a RunPod Instant
                            Cluster, ``$NODE_ADDR`` or the address that reaches ``$MASTER_ADDR``
``HEAD_ADDRESS``            worker only: ``<head private IP or private DNS name>:<GCS port>``;
                            a ``*.runpod.internal`` name is resolved here (Ray gets the IP)
``NODE_RANK``, ``MASTER_ADDR``  set by RunPod in an Instant Cluster (with ``NODE_ADDR``,
                            ``NUM_NODES``, ...): without ``ROLE``, rank 0 is the head and the
                            others join ``$MASTER_ADDR:<GCS port>``; NCCL is pointed at the
                            cluster's ``ens*`` interfaces (``NCCL_SOCKET_IFNAME``). Every node gets
                            the same env there, so ``RAY_TEMP_DIR`` becomes ``<it>/r<NODE_RANK>``
                            and ranks above 0 take ``WORKER_<NAME>_PORT`` over ``<NAME>_PORT``
                            when given (several nodes on one machine: tests). Idle, a member ends
                            its whole cluster (``DELETE /v2/clusters/{id}``: RunPod refuses to
                            terminate one member through the pod endpoints)
``IDLE_TIMEOUT_S``          end this pod (RunPod REST v2, with the pod-scoped ``RUNPOD_API_KEY``
                            RunPod injects) after this long with no Ray Job and no home
                            heartbeat; ``600``, ``10m``, ``1h``. See :mod:`.idle_watch`
``GPU_PROXY_TEST_INTERNAL_IP``  TEST ONLY (RunPod never sets it): the address every
                            ``*.runpod.internal`` name and every Instant Cluster address
                            (``MASTER_ADDR``, ``NODE_ADDR``) stands for; the tests' fake RunPod,
                            whose pods are processes on one machine, sets it to that machine's address
``RAY_TOKEN_FILE``          the Ray auth token's file (default ``/run/gpu-proxy/ray_token``),
                            mode 0600. It may arrive after start (copied in over SSH): the
                            entrypoint waits ``RAY_TOKEN_WAIT_S`` seconds (default 900) for it.
                            The token never travels in the environment, which clouds echo back.
``NUM_GPUS`` / ``NUM_CPUS`` what Ray may use (default: what Ray detects)
``RAY_TEMP_DIR``            Ray's temp/log folder (default Ray's, /tmp/ray)
``RAY_BIN``                 the ``ray`` command (default: beside this Python, else on PATH)
``<NAME>_PORT``             Ray's ports: ``GCS_PORT``, ``DASHBOARD_PORT``, ``CLIENT_SERVER_PORT``,
                            ``NODE_MANAGER_PORT``, ``OBJECT_MANAGER_PORT``, ``MIN_WORKER_PORT``...
``PUBLIC_KEY``              SSH public key(s) allowed to log in, one per line (RunPod's name)
``SSHD``                    ``auto`` (default: run sshd when PUBLIC_KEY is set), ``on``, ``off``
``SSHD_PORT``               default 22; ``SSHD_LISTEN_ADDRESS`` default 0.0.0.0
``SSHD_DIR``                host keys and the generated sshd_config (default /etc/ssh)
``SSH_AUTHORIZED_KEYS``     where PUBLIC_KEY is written (default ~/.ssh/authorized_keys)
``SSHD_STRICT_MODES``       ``yes`` (default) or ``no`` (keys in a world-writable folder, tests)
==========================  =============================================================

Exit status: 2 for bad configuration (with every problem listed), 1 when Ray or sshd fails,
Ray's own status when it exits, 0 after SIGTERM/SIGINT stopped the node cleanly. A ``ray start``
that fails within 90 s of its start (its raylet missed Ray's fixed 30 s, as on a loaded machine) is
tried once more before the node ends.
"""
