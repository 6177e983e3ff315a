"""The atlas prior: the reference space, registration, label fusion, the built-in atlas."""
