"""Istio's L4 authorization as ztunnel enforces it: AuthorizationPolicy (ALLOW, DENY) and PeerAuthentication
(STRICT, PERMISSIVE, DISABLE), decided per connection without I/O.

    engine = PolicyEngine(root_namespace="istio-system")
    rejected = engine.update(kubernetes_objects)   # the whole set; other kinds are ignored
    decision = engine.evaluate(Peer(principal, namespace, ip), Target(namespace, labels, ip, port))

Modules: ``model`` (the values), ``objects`` (reading and validating the Kubernetes objects into typed
values, the whole API: what a waypoint would read too), ``l4`` (the L4 projection: what ztunnel enforces of
those values, as rules), ``matchers`` (what rules test, as data), ``compiler`` (rules into straight-line
functions), ``engine`` (scopes, caches, decisions).

Choices where Istio's documentation says nothing explicit, following istiod's ambient translation and
ztunnel's enforcement where they settle it:

* A plaintext peer has no principal and no namespace: it matches no ``principals``/``namespaces``/
  ``serviceAccounts`` value (not even ``*``) and every ``not*`` one (so DENY ``notPrincipals: ["*"]``
  denies plaintext). ``serviceAccounts`` entries are ``ns/sa`` or a bare ``sa`` in the policy's namespace,
  and match whatever the trust domain.
* An empty list is the same as an absent field. A ``from`` source or ``to`` operation left with no L4
  field once HTTP attributes are dropped (DENY) matches everything.
* ``selector`` with no labels selects the whole namespace. A PeerAuthentication with a selector in the
  root namespace applies to the matching pods of the root namespace only.
* Several PeerAuthentications at one level (mesh, namespace, or selecting the same workload): the oldest
  by ``metadata.creationTimestamp`` wins, then the first by name; the others are noted.
* When several rules match, the decision names the first: DENY policies mesh-wide before namespace-wide
  before selector ones, by name within each; rules by index.
* A connection denied because no ALLOW policy matched has ``policy=None`` and names the ALLOW policies
  that applied in its reason.
* Rejected, as Istio's webhook would: unknown fields, DENY (and CUSTOM) without rules, CUSTOM without a
  provider or with the source fields and ``when`` keys it cannot check, empty ``from``/``to``/source/operation,
  ``when`` keys Istio does not know, ``serviceAccounts`` together with ``principals``/``namespaces``,
  ``portLevelMtls`` without a selector, selector together with targetRefs, targetRefs to kinds other than
  Service, ServiceEntry, Gateway and GatewayClass, path templates other than ``{*}``/``{**}``. Port numbers
  must be strings in 1..65535 (port 0 too is refused). A ``metadata.namespace`` left out is ``default``; one
  given must be a non-empty string. ``*`` in the middle of a value and principals written with ``spiffe://``
  are accepted (they never match) with a note.
* Refused at L4, as istiod refuses to hand them to ztunnel: AUDIT and CUSTOM policies. Policies with
  targetRefs are accepted, kept whole (``PolicyEngine.waypoint_policies``) and not enforced here, whatever
  their action: Istio applies them at waypoints and gateways.
"""

from agent.policy.engine import ALLOWED_BY_DEFAULT, PolicyEngine
from agent.policy.model import Decision, Peer, PolicyError, Target

__all__ = ["ALLOWED_BY_DEFAULT", "Decision", "Peer", "PolicyEngine", "PolicyError", "Target"]
