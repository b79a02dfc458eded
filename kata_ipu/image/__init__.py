"""Image management: references, registry client, auth/credentials, mirrors, pulls.

Modules (one job each): :mod:`.reference` (parse ``[registry/]repo[:tag][@digest]``),
:mod:`.hosts` (containerd ``hosts.toml`` mirrors), :mod:`.credentials` (config.json, helpers),
:mod:`.auth` (challenges, tokens), :mod:`.transport` (http.client), :mod:`.registry` (blocking
v2 client: retries, resume, redirects, stall timeout) and :mod:`.pull` (the async
``Puller.pull`` the daemon uses).

Imports: :mod:`kata_ipu.oci` (the spec types: digests, media types, platforms, manifests),
:mod:`kata_ipu.content` (the store a pull writes into), :mod:`kata_ipu.errors`,
:mod:`kata_ipu.executor`, :mod:`kata_ipu.log`. Nothing below imports ``image``.
"""
