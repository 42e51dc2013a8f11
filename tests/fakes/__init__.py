"""Stand-ins for paid services the tests cannot reach: only the cloud APIs themselves are faked."""
