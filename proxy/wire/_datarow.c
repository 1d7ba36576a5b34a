/*
 * The values of a DataRow message body, in C: a federated SELECT reads every row it merges
 * (sort keys, aggregates), and this split is most of that cost in Python (2 us a row here,
 * 0.2 us in C). proxy/wire/messages.py uses it when it is built and its own code when not;
 * the tests hold the two equal, malformed bodies included.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int32_t
read_i32(const unsigned char *p)
{
    return (int32_t) (((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) | ((uint32_t) p[2] << 8) | (uint32_t) p[3]);
}

/* fields(body) -> list of bytes or None; ValueError if the body is not a whole DataRow. */
static PyObject *
fields(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    const unsigned char *data;
    Py_ssize_t size, pos = 2, i;
    int count;
    PyObject *out = NULL;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    data = (const unsigned char *) view.buf;
    size = view.len;
    if (size < 2)
        goto malformed;
    count = (int16_t) (((uint16_t) data[0] << 8) | data[1]);
    if (count < 0)
        goto malformed;
    out = PyList_New(count);
    if (out == NULL)
        goto done;
    for (i = 0; i < count; i++) {
        int32_t length;
        PyObject *value;

        if (size - pos < 4)
            goto malformed;
        length = read_i32(data + pos);
        pos += 4;
        if (length < 0) {
            Py_INCREF(Py_None);
            value = Py_None;
        } else {
            if (size - pos < length)
                goto malformed;
            value = PyBytes_FromStringAndSize((const char *) data + pos, length);
            if (value == NULL) {
                Py_CLEAR(out);
                goto done;
            }
            pos += length;
        }
        PyList_SET_ITEM(out, i, value);
    }
    goto done;

malformed:
    Py_CLEAR(out);
    PyErr_SetString(PyExc_ValueError, "malformed DataRow: a value runs past the end of the message");
done:
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"fields", fields, METH_O, "The values of a DataRow body (None for NULL)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.wire._datarow", "DataRow values, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__datarow(void)
{
    return PyModule_Create(&module);
}
