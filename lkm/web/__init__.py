"""lkm's HTTP side: one module per route family, each listener's wire formats to the byte.

    routes     every path and listener name, in one place
    plumbing   what every route shares: request ids, errors -> responses, request finishing, the access log,
               body reading, the request context handed to the service
    native     lkm's JSON API behind mutual TLS: identity, key listing, single unwrap
    admin      key administration on the native listener (and the platform sample's admin routes)
    batch      batch unwrap on the native listener
    platform   the platform's Hawk-authenticated decrypt route, on aiohttp's low-level server
    ops        /healthz, /readyz, /metrics on the plain-HTTP operations listener

Handlers only translate between HTTP and lkm.service / lkm.keyadmin; they decide nothing.
"""
