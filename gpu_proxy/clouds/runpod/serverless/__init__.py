"""RunPod Serverless: runs as jobs of a serverless endpoint, each on one worker. See docs/serverless.md."""
from gpu_proxy.clouds.runpod.serverless.cluster import RunPodServerless

__all__ = ["RunPodServerless"]
