"""Traffic policy: rate limits and quotas in audio units, concurrency slots and budgets, per key, tenant and
(tenant, model), counted in the shared state store (gateway/store/) so they hold across workers and replicas.

    rules.py      what the YAML configures (limits, budgets, the `state:` section)
    windows.py    windows and periods in UTC, calendar months included
    demand.py     what a request asks for (its cost per measure, its worst case per budget), which rules apply
    shared.py     the store with its failure policy (fall back to memory, or refuse) and its metrics
    admission.py  per request: admit before any backend call, or answer 429; settle when it is over
    rate_headers.py  OpenAI's x-ratelimit-* headers
"""
