"""The selection core: the pipeline (`Selector`), fusion, eligibility rules, frequency caps, and the factory that
builds them from settings. Stands on retrieval/ and agent/; server/ and eval/ stand on it."""
