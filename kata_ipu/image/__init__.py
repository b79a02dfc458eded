"""Image management: references, registry client, auth/credentials, mirrors, manifests.

Modules (one job each): :mod:`.reference` (parse ``[registry/]repo[:tag][@digest]``),
:mod:`.mediatypes`, :mod:`.platform`, :mod:`.manifest` (typed Descriptor/Manifest/Index/
ImageConfig), :mod:`.hosts` (containerd ``hosts.toml`` mirrors), :mod:`.credentials`
(config.json, helpers), :mod:`.auth` (challenges, tokens), :mod:`.transport` (http.client),
:mod:`.registry` (blocking v2 client: retries, resume, redirects, stall timeout) and
:mod:`.pull` (the async ``Puller.pull`` the daemon uses).
"""
