"""m3ddm_jax.jitting: the one way models are jitted (static hashed graph, state and inputs as arrays)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3ddm_jax import jitting


@jitting.model_jit
def _apply(graphdef, state, x):
    return nnx.merge(graphdef.value, state)(x)


def test_equal_structures_share_one_compile_and_give_eager_results():
    """Two models of one structure (other weights) reuse one compiled function, and each gets its own result."""
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    models = [nnx.Linear(2, 4, rngs=nnx.Rngs(seed)) for seed in (0, 1)]
    before = _apply._cache_size()
    outs = [_apply(*jitting.split(m), x) for m in models]
    assert _apply._cache_size() == before + 1
    for model, out in zip(models, outs):
        np.testing.assert_allclose(out, model(x), rtol=1e-6)
    assert not np.allclose(outs[0], outs[1])


def test_bare_graphdef_is_refused():
    graphdef, state = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="jitting.Static"):
        _apply(graphdef, state, np.zeros((1, 2), np.float32))


def test_bound_calls_and_lowers_with_shardings_and_donation():
    """Bound: called and lowered on the arrays only; in_shardings, donation and static_argnums are jax.jit's."""
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @jitting.model_jit(static_argnums=3, in_shardings=(replicated, replicated), donate_argnums=1)
    def scaled(graphdef, state, x, factor):  # returns the state too: its buffers can then be reused
        return state, nnx.merge(graphdef.value, state)(x) * factor

    graph, state = jitting.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    bound = jitting.Bound(scaled, graph)
    x = jnp.ones((1, 2))
    want = nnx.merge(graph.value, state)(x) * 2
    np.testing.assert_allclose(bound(jax.tree.map(jnp.copy, state), x, 2)[1], want, rtol=1e-6)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), (state, x))
    assert "tf.aliasing_output" in bound.lower(*abstract, 2).as_text()  # the state is donated
