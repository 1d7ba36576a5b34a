/*
 * The partition hash of a shard-key value, in C: the one piece of routing arithmetic
 * that runs for every Bind of a parameter-routed statement.
 *
 * It computes exactly what shard.py computes in Python (PostgreSQL's lookup3-based
 * extended hash with the partition seed, then hash_combine64(0, h)); shard.py uses this
 * module when it is built and its own code when it is not, and the tests hold the two
 * equal. In Python the 32-bit mixing costs about 2 µs a key; here about 50 ns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define PARTITION_SEED UINT64_C(0x7A5B22367996DCFD)
#define COMBINE UINT64_C(0x49A0F4DD15E5A8E3)

#define ROT(x, k) (((x) << (k)) | ((x) >> (32 - (k))))

#define MIX(a, b, c) do { \
    a -= c; a ^= ROT(c, 4);  c += b; \
    b -= a; b ^= ROT(a, 6);  a += c; \
    c -= b; c ^= ROT(b, 8);  b += a; \
    a -= c; a ^= ROT(c, 16); c += b; \
    b -= a; b ^= ROT(a, 19); a += c; \
    c -= b; c ^= ROT(b, 4);  b += a; \
} while (0)

#define FINAL(a, b, c) do { \
    c ^= b; c -= ROT(b, 14); \
    a ^= c; a -= ROT(c, 11); \
    b ^= a; b -= ROT(a, 25); \
    c ^= b; c -= ROT(b, 16); \
    a ^= c; a -= ROT(c, 4);  \
    b ^= a; b -= ROT(a, 14); \
    c ^= b; c -= ROT(b, 24); \
} while (0)

static void
seeded(uint32_t length, uint32_t *a, uint32_t *b, uint32_t *c)
{
    *a = *b = *c = 0x9e3779b9 + length + 3923095;
    *a += (uint32_t) (PARTITION_SEED >> 32);
    *b += (uint32_t) PARTITION_SEED;
    MIX(*a, *b, *c);
}

static uint32_t
word(const unsigned char *p)
{
    return (uint32_t) p[0] | ((uint32_t) p[1] << 8) | ((uint32_t) p[2] << 16) | ((uint32_t) p[3] << 24);
}

static uint64_t
row_hash(uint32_t b, uint32_t c)
{
    return ((((uint64_t) b) << 32) | c) + COMBINE;
}

/* hashint8extended: the low word, folded with the high one (inverted for negatives). */
static uint64_t
int_hash(int64_t value)
{
    uint32_t lo = (uint32_t) value, hi = (uint32_t) ((uint64_t) value >> 32);
    uint32_t a, b, c;

    lo ^= value >= 0 ? hi : ~hi;
    seeded(4, &a, &b, &c);
    a += lo;
    FINAL(a, b, c);
    return row_hash(b, c);
}

/* hash_bytes_extended, reading words little-endian as PostgreSQL does on x86 and ARM. */
static uint64_t
bytes_hash(const unsigned char *data, Py_ssize_t length)
{
    uint32_t a, b, c;
    unsigned char tail[12] = {0};
    Py_ssize_t rest = length;

    seeded((uint32_t) length, &a, &b, &c);
    while (rest >= 12) {
        a += word(data);
        b += word(data + 4);
        c += word(data + 8);
        MIX(a, b, c);
        data += 12;
        rest -= 12;
    }
    memcpy(tail, data, (size_t) rest);
    a += word(tail);
    b += word(tail + 4);
    c += word(tail + 8) << 8;  /* the lowest byte of c was meant for the length */
    FINAL(a, b, c);
    return row_hash(b, c);
}

static PyObject *
py_int_hash(PyObject *module, PyObject *arg)
{
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(arg, &overflow);

    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "shard key does not fit in int8");
        return NULL;
    }
    if (value == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(int_hash((int64_t) value));
}

static PyObject *
py_int_shard_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int overflow = 0;
    long long value, shards;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "int_shard_of(value, shards)");
        return NULL;
    }
    value = PyLong_AsLongLongAndOverflow(args[0], &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "shard key does not fit in int8");
        return NULL;
    }
    if (value == -1 && PyErr_Occurred())
        return NULL;
    shards = PyLong_AsLongLong(args[1]);
    if (shards == -1 && PyErr_Occurred())
        return NULL;
    if (shards <= 0) {
        PyErr_SetString(PyExc_ValueError, "shards must be positive");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(int_hash((int64_t) value) % (uint64_t) shards);
}

static PyObject *
py_bytes_hash(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    uint64_t hash;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    hash = bytes_hash((const unsigned char *) view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(hash);
}

static PyMethodDef methods[] = {
    {"int_hash", py_int_hash, METH_O, "The partition row hash of an int2/int4/int8 key."},
    {"int_shard_of", (PyCFunction) (void (*)(void)) py_int_shard_of, METH_FASTCALL,
     "int_shard_of(value, shards): the hash shard of an integer key."},
    {"bytes_hash", py_bytes_hash, METH_O, "The partition row hash of a text (UTF-8) or uuid (16 bytes) key."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.router._hash", "PostgreSQL's partition hash, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__hash(void)
{
    return PyModule_Create(&module);
}
