/* dadi._native: the C twins of the lookup kernels in dadi/format/index.py (class _PythonKernel).
 *
 * The merged index of a layer stack is four flat arrays built once by Python: segment start block,
 * end block (uint64, sorted, non-overlapping), layer and packed byte offset of the start block (int64).
 * This module only searches them. Every buffer is checked for format, shape, alignment and length
 * before use, so bad input raises TypeError/ValueError instead of reading out of bounds; unsorted
 * arrays give meaningless results but never touch memory outside the buffers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define ZERO_LAYER (-1)

typedef enum { UINT64_ITEMS, INT64_ITEMS } item_kind;

/* True for the struct-module formats of a native 8-byte integer of the wanted signedness. */
static int format_matches(const char *format, item_kind kind)
{
    if (format == NULL) /* NULL means unsigned bytes */
        return 0;
    if (format[0] == '@' || format[0] == '=')
        format++;
#if PY_LITTLE_ENDIAN
    else if (format[0] == '<')
        format++;
#else
    else if (format[0] == '>' || format[0] == '!')
        format++;
#endif
    if (format[0] == '\0' || format[1] != '\0')
        return 0;
    if (kind == UINT64_ITEMS)
        return format[0] == 'Q' || (format[0] == 'L' && sizeof(unsigned long) == 8);
    return format[0] == 'q' || (format[0] == 'l' && sizeof(long) == 8);
}

/* Acquire `obj` as a contiguous 1-d buffer of 8-byte integers; sets an exception and returns -1 if not. */
static int get_items(PyObject *obj, Py_buffer *view, item_kind kind, int writable, const char *name)
{
    const char *type_name = kind == UINT64_ITEMS ? "uint64 (array('Q'))" : "int64 (array('q'))";
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous %sbuffer of %s, got %.100s", name,
                     writable ? "writable " : "", type_name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (view->ndim != 1 || view->itemsize != 8 || !format_matches(view->format, kind)) {
        PyErr_Format(PyExc_TypeError, "%s must be a 1-d buffer of %s, got format '%.20s' itemsize %zd "
                     "ndim %d", name, type_name, view->format ? view->format : "B", view->itemsize,
                     view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    /* an empty buffer's pointer is never dereferenced, and some exporters leave it unaligned */
    if (view->len > 0 && (uintptr_t)view->buf % _Alignof(uint64_t) != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned to 8 bytes", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* A set of acquired buffers, released together whatever happens. */
typedef struct {
    Py_buffer views[8];
    int held;
} buffer_set;

static Py_buffer *acquire(buffer_set *set, PyObject *obj, item_kind kind, int writable, const char *name)
{
    Py_buffer *view = &set->views[set->held];
    if (get_items(obj, view, kind, writable, name) < 0)
        return NULL;
    set->held++;
    return view;
}

static void release_all(buffer_set *set)
{
    while (set->held > 0)
        PyBuffer_Release(&set->views[--set->held]);
}

static Py_ssize_t item_count(const Py_buffer *view) { return view->len / 8; }

/* Parse a Python int in 0..2**64-1 (OverflowError otherwise, TypeError for non-ints). */
static int get_u64(PyObject *obj, uint64_t *value, const char *name)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.100s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_OverflowError, "%s must be in 0..2**64-1", name);
        return -1;
    }
    *value = (uint64_t)v;
    return 0;
}

/* Number of leading items <= x (strict == 0) or < x (strict == 1) in the sorted array a[0..n).
 * Branch-free halving: the loop runs log2(n) times whatever the data, and the compiler turns the
 * select into a conditional move, so random lookups do not pay for mispredicted branches. */
static inline size_t count_leading(const uint64_t *a, size_t n, uint64_t x, int strict)
{
    if (n == 0)
        return 0;
    const uint64_t *base = a;
    while (n > 1) {
        size_t half = n / 2;
        int before = strict ? base[half] < x : base[half] <= x;
        base = before ? base + half : base;
        n -= half;
    }
    int last_before = strict ? *base < x : *base <= x;
    return (size_t)(base - a) + (size_t)last_before;
}

PyDoc_STRVAR(find_segments_doc,
"find_segments(starts, ends, first_block, end_block) -> (i, j)\n\n"
"Index range [i, j) of the segments that overlap blocks [first_block, end_block).");

static PyObject *find_segments(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *starts_obj, *ends_obj, *first_obj, *end_obj;
    if (!PyArg_ParseTuple(args, "OOOO:find_segments", &starts_obj, &ends_obj, &first_obj, &end_obj))
        return NULL;
    uint64_t first_block, end_block;
    if (get_u64(first_obj, &first_block, "first_block") < 0 || get_u64(end_obj, &end_block, "end_block") < 0)
        return NULL;
    buffer_set set = {.held = 0};
    Py_buffer *starts = acquire(&set, starts_obj, UINT64_ITEMS, 0, "starts");
    Py_buffer *ends = starts ? acquire(&set, ends_obj, UINT64_ITEMS, 0, "ends") : NULL;
    if (ends == NULL) {
        release_all(&set);
        return NULL;
    }
    if (item_count(starts) != item_count(ends)) {
        PyErr_Format(PyExc_ValueError, "starts and ends must have the same length, got %zd, %zd",
                     item_count(starts), item_count(ends));
        release_all(&set);
        return NULL;
    }
    size_t n = (size_t)item_count(starts);
    /* Segments are sorted and disjoint, so ends are sorted too: the first overlapping segment is the
     * first whose end lies past first_block, the last is before the first that starts at end_block. */
    size_t first = count_leading(ends->buf, n, first_block, 0);
    size_t stop = count_leading(starts->buf, n, end_block, 1);
    release_all(&set);
    return Py_BuildValue("(nn)", (Py_ssize_t)first, (Py_ssize_t)(stop > first ? stop : first));
}

/* The batched hot loop; runs without the GIL. Returns the position of the first block at or past
 * `limit`, or -1 when every block was looked up. */
static Py_ssize_t lookup_loop(const uint64_t *starts, const uint64_t *ends, const int64_t *layers,
                              const int64_t *offsets, size_t n, uint64_t block_size, uint64_t limit,
                              const uint64_t *blocks, int64_t *out_layers, int64_t *out_offsets, size_t m)
{
    for (size_t i = 0; i < m; i++) {
        uint64_t block = blocks[i];
        if (block >= limit)
            return (Py_ssize_t)i;
        size_t k = count_leading(starts, n, block, 0);
        int64_t layer = ZERO_LAYER;
        int64_t offset = 0;
        if (k > 0 && block < ends[k - 1] && layers[k - 1] != ZERO_LAYER) {
            layer = layers[k - 1];
            /* unsigned arithmetic: hostile tables may overflow, which must not be undefined behaviour */
            offset = (int64_t)((uint64_t)offsets[k - 1] + (block - starts[k - 1]) * block_size);
        }
        out_layers[i] = layer;
        out_offsets[i] = offset;
    }
    return -1;
}

PyDoc_STRVAR(lookup_blocks_doc,
"lookup_blocks(starts, ends, layers, offsets, block_size, limit, blocks, out_layers, out_offsets)\n\n"
"For each blocks[i] write the serving layer (-1 for zeros) to out_layers[i] and the packed byte\n"
"offset of the block (0 for zeros) to out_offsets[i]. ValueError for a block >= limit.");

static PyObject *lookup_blocks(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *starts_obj, *ends_obj, *layers_obj, *offsets_obj, *limit_obj;
    PyObject *blocks_obj, *out_layers_obj, *out_offsets_obj;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "OOOOnOOOO:lookup_blocks", &starts_obj, &ends_obj, &layers_obj,
                          &offsets_obj, &block_size, &limit_obj, &blocks_obj, &out_layers_obj,
                          &out_offsets_obj))
        return NULL;
    if (block_size <= 0) {
        PyErr_Format(PyExc_ValueError, "block_size must be positive, got %zd", block_size);
        return NULL;
    }
    uint64_t limit;
    if (get_u64(limit_obj, &limit, "limit") < 0)
        return NULL;

    buffer_set set = {.held = 0};
    Py_buffer *starts = acquire(&set, starts_obj, UINT64_ITEMS, 0, "starts");
    Py_buffer *ends = starts ? acquire(&set, ends_obj, UINT64_ITEMS, 0, "ends") : NULL;
    Py_buffer *layers = ends ? acquire(&set, layers_obj, INT64_ITEMS, 0, "layers") : NULL;
    Py_buffer *offsets = layers ? acquire(&set, offsets_obj, INT64_ITEMS, 0, "offsets") : NULL;
    Py_buffer *blocks = offsets ? acquire(&set, blocks_obj, UINT64_ITEMS, 0, "blocks") : NULL;
    Py_buffer *out_layers = blocks ? acquire(&set, out_layers_obj, INT64_ITEMS, 1, "out_layers") : NULL;
    Py_buffer *out_offsets = out_layers ? acquire(&set, out_offsets_obj, INT64_ITEMS, 1, "out_offsets")
                                        : NULL;
    if (out_offsets == NULL) {
        release_all(&set);
        return NULL;
    }
    Py_ssize_t n = item_count(starts), m = item_count(blocks);
    if (item_count(ends) != n || item_count(layers) != n || item_count(offsets) != n) {
        PyErr_Format(PyExc_ValueError, "starts, ends, layers and offsets must have the same length, "
                     "got %zd, %zd, %zd, %zd", n, item_count(ends), item_count(layers), item_count(offsets));
        release_all(&set);
        return NULL;
    }
    if (item_count(out_layers) != m || item_count(out_offsets) != m) {
        PyErr_Format(PyExc_ValueError, "blocks, out_layers and out_offsets must have the same length, "
                     "got %zd, %zd, %zd", m, item_count(out_layers), item_count(out_offsets));
        release_all(&set);
        return NULL;
    }

    Py_ssize_t bad;
    /* The exported buffers cannot be resized or freed while we hold them, so the loop is safe to run
     * while other threads use the interpreter. */
    Py_BEGIN_ALLOW_THREADS
    bad = lookup_loop(starts->buf, ends->buf, layers->buf, offsets->buf, (size_t)n, (uint64_t)block_size,
                      limit, blocks->buf, out_layers->buf, out_offsets->buf, (size_t)m);
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "block %llu (at position %zd) is past the end of the disk "
                     "(%llu blocks)", (unsigned long long)((const uint64_t *)blocks->buf)[bad], bad,
                     (unsigned long long)limit);
        release_all(&set);
        return NULL;
    }
    release_all(&set);
    Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"find_segments", find_segments, METH_VARARGS, find_segments_doc},
    {"lookup_blocks", lookup_blocks, METH_VARARGS, lookup_blocks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native", "C twins of dadi's hot paths (see dadi/format/index.py).", -1,
    native_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
